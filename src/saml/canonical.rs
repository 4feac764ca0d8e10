//! Escaping for documents written directly in exclusive-canonical form.
//!
//! Canonical XML (C14N 1.0 §2.3, shared by exclusive c14n) fixes how text and attribute
//! values are escaped. Writing them that way from the start means the bytes we digest are
//! the bytes any verifier's canonicalizer will produce, with no c14n engine of our own.

use std::fmt;

/// A string that XML 1.0 cannot carry (control characters other than tab, LF and CR,
/// or the non-characters U+FFFE and U+FFFF). Such values are refused, never altered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotXmlText;

impl fmt::Display for NotXmlText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("contains characters that XML 1.0 cannot carry")
    }
}

/// True when every character may appear in an XML 1.0 document (the `Char` production).
pub fn is_xml_text(value: &str) -> bool {
    value.chars().all(|c| {
        matches!(c, '\t' | '\n' | '\r')
            || ('\u{20}'..='\u{D7FF}').contains(&c)
            || ('\u{E000}'..='\u{FFFD}').contains(&c)
            || c >= '\u{10000}'
    })
}

/// Appends `value` as canonical character data: `&`, `<`, `>` and CR are escaped.
pub fn push_text(out: &mut String, value: &str) -> Result<(), NotXmlText> {
    push_escaped(out, value, |c| match c {
        '&' => Some("&amp;"),
        '<' => Some("&lt;"),
        '>' => Some("&gt;"),
        '\r' => Some("&#xD;"),
        _ => None,
    })
}

/// Appends `value` as a canonical attribute value (without the quotes): `&`, `<`, `"`,
/// tab, LF and CR are escaped, so attribute-value normalization cannot change it.
pub fn push_attribute(out: &mut String, value: &str) -> Result<(), NotXmlText> {
    push_escaped(out, value, |c| match c {
        '&' => Some("&amp;"),
        '<' => Some("&lt;"),
        '"' => Some("&quot;"),
        '\t' => Some("&#x9;"),
        '\n' => Some("&#xA;"),
        '\r' => Some("&#xD;"),
        _ => None,
    })
}

fn push_escaped(
    out: &mut String,
    value: &str,
    escape: fn(char) -> Option<&'static str>,
) -> Result<(), NotXmlText> {
    if !is_xml_text(value) {
        return Err(NotXmlText);
    }
    for c in value.chars() {
        match escape(c) {
            Some(reference) => out.push_str(reference),
            None => out.push(c),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &str) -> Result<String, NotXmlText> {
        let mut s = String::new();
        push_text(&mut s, v).map(|_| s)
    }

    fn attr(v: &str) -> Result<String, NotXmlText> {
        let mut s = String::new();
        push_attribute(&mut s, v).map(|_| s)
    }

    #[test]
    fn escapes_text_as_c14n_does() {
        assert_eq!(
            text("a<b>&\"'\r\n\t]]>").unwrap(),
            "a&lt;b&gt;&amp;\"'&#xD;\n\t]]&gt;"
        );
        assert_eq!(text("&amp;").unwrap(), "&amp;amp;");
    }

    #[test]
    fn escapes_attributes_as_c14n_does() {
        assert_eq!(
            attr("a<b>&\"'\r\n\t").unwrap(),
            "a&lt;b>&amp;&quot;'&#xD;&#xA;&#x9;"
        );
    }

    #[test]
    fn keeps_unicode_and_refuses_what_xml_cannot_carry() {
        assert_eq!(
            text("e\u{301} \u{202E}x 𝄞").unwrap(),
            "e\u{301} \u{202E}x 𝄞"
        );
        assert_eq!(text("a\u{0}b"), Err(NotXmlText));
        assert_eq!(attr("\u{1b}[31m"), Err(NotXmlText));
        assert_eq!(text("\u{FFFE}"), Err(NotXmlText));
        assert_eq!(text("\u{7F}").unwrap(), "\u{7F}");
    }
}
