//! The SAML 2.0 bearer assertion, written directly in exclusive-canonical form.
//!
//! Element order follows SAML core: Issuer, (Signature), Subject, Conditions,
//! AuthnStatement, AttributeStatement. The bearer confirmation carries `Recipient` and
//! `NotOnOrAfter` but no `NotBefore`, and Conditions hold exactly one
//! AudienceRestriction: Cloud Foundry UAA / SAP XSUAA reject anything else.
//!
//! Canonical form (exc-c14n) here means: the one namespace declaration on the root,
//! attributes in sorted order, no whitespace between elements, explicit end tags, and
//! values escaped by [`super::canonical`]. The document is split around the place of
//! the signature, because the enveloped-signature transform digests it without one.

use super::canonical::{push_attribute, push_text, NotXmlText};
use crate::time::xs_date_time;

/// SAML 2.0 assertion namespace.
pub const SAML2_NS: &str = "urn:oasis:names:tc:SAML:2.0:assertion";
const BEARER: &str = "urn:oasis:names:tc:SAML:2.0:cm:bearer";
const ATTRNAME_BASIC: &str = "urn:oasis:names:tc:SAML:2.0:attrname-format:basic";

/// One attribute of the AttributeStatement; values are plain strings (no `xsi:type`,
/// which exclusive c14n could not protect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub name: String,
    pub values: Vec<String>,
}

/// Everything that varies between assertions. Times are host Unix milliseconds.
#[derive(Debug, Clone)]
pub struct AssertionContent<'a> {
    /// Fresh per token request, `_`-prefixed (an NCName); targets reject replays.
    pub id: &'a str,
    pub issue_instant_ms: u64,
    pub issuer: &'a str,
    pub name_id: &'a str,
    pub name_id_format: &'a str,
    pub name_qualifier: Option<&'a str>,
    pub recipient: &'a str,
    pub audience: &'a str,
    pub authn_context_class_ref: &'a str,
    /// Conditions/@NotBefore: issue instant minus the configured clock skew.
    pub not_before_ms: u64,
    /// Conditions/@NotOnOrAfter and SubjectConfirmationData/@NotOnOrAfter.
    pub not_on_or_after_ms: u64,
    pub attributes: &'a [Attribute],
}

/// A value of the assertion that cannot be written as XML; names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnwritableField(pub &'static str);

/// The canonical assertion split where `ds:Signature` goes (right after Issuer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalAssertion {
    pub head: String,
    pub tail: String,
}

impl CanonicalAssertion {
    /// The assertion without a signature: what the enveloped transform digests.
    pub fn unsigned(&self) -> String {
        [self.head.as_str(), self.tail.as_str()].concat()
    }
}

/// Writes the assertion in exclusive-canonical form.
pub fn write(content: &AssertionContent<'_>) -> Result<CanonicalAssertion, UnwritableField> {
    let mut w = Writer(String::with_capacity(2048));
    let issue_instant = xs_date_time(content.issue_instant_ms);
    let not_on_or_after = xs_date_time(content.not_on_or_after_ms);

    w.raw("<saml2:Assertion xmlns:saml2=\"");
    w.raw(SAML2_NS);
    w.raw("\"");
    w.attr("ID", content.id, "ID")?;
    w.attr("IssueInstant", &issue_instant, "IssueInstant")?;
    w.raw(" Version=\"2.0\">");
    w.text_element("saml2:Issuer", content.issuer, "assertionIssuer")?;
    let head = std::mem::take(&mut w.0);

    w.raw("<saml2:Subject><saml2:NameID");
    w.attr("Format", content.name_id_format, "nameIdFormat")?;
    if let Some(qualifier) = content.name_qualifier {
        w.attr("NameQualifier", qualifier, "nameQualifier")?;
    }
    w.raw(">");
    w.text(content.name_id, "user id")?;
    w.raw("</saml2:NameID><saml2:SubjectConfirmation Method=\"");
    w.raw(BEARER);
    w.raw("\"><saml2:SubjectConfirmationData");
    w.attr("NotOnOrAfter", &not_on_or_after, "NotOnOrAfter")?;
    w.attr("Recipient", content.recipient, "assertionRecipient")?;
    w.raw("></saml2:SubjectConfirmationData></saml2:SubjectConfirmation></saml2:Subject>");

    w.raw("<saml2:Conditions");
    w.attr(
        "NotBefore",
        &xs_date_time(content.not_before_ms),
        "NotBefore",
    )?;
    w.attr("NotOnOrAfter", &not_on_or_after, "NotOnOrAfter")?;
    w.raw("><saml2:AudienceRestriction>");
    w.text_element("saml2:Audience", content.audience, "audience")?;
    w.raw("</saml2:AudienceRestriction></saml2:Conditions>");

    w.raw("<saml2:AuthnStatement");
    w.attr("AuthnInstant", &issue_instant, "AuthnInstant")?;
    w.attr("SessionIndex", content.id, "SessionIndex")?;
    w.raw("><saml2:AuthnContext>");
    w.text_element(
        "saml2:AuthnContextClassRef",
        content.authn_context_class_ref,
        "authnContextClassRef",
    )?;
    w.raw("</saml2:AuthnContext></saml2:AuthnStatement>");

    if !content.attributes.is_empty() {
        w.raw("<saml2:AttributeStatement>");
        for attribute in content.attributes {
            w.raw("<saml2:Attribute");
            w.attr("Name", &attribute.name, "attribute name")?;
            w.attr("NameFormat", ATTRNAME_BASIC, "NameFormat")?;
            w.raw(">");
            for value in &attribute.values {
                w.text_element("saml2:AttributeValue", value, "attribute value")?;
            }
            w.raw("</saml2:Attribute>");
        }
        w.raw("</saml2:AttributeStatement>");
    }
    w.raw("</saml2:Assertion>");
    Ok(CanonicalAssertion { head, tail: w.0 })
}

/// Appends canonical markup; `field` names the value in errors.
struct Writer(String);

impl Writer {
    fn raw(&mut self, markup: &str) {
        self.0.push_str(markup);
    }

    fn attr(
        &mut self,
        name: &str,
        value: &str,
        field: &'static str,
    ) -> Result<(), UnwritableField> {
        self.0.push(' ');
        self.0.push_str(name);
        self.0.push_str("=\"");
        push_attribute(&mut self.0, value).map_err(|NotXmlText| UnwritableField(field))?;
        self.0.push('"');
        Ok(())
    }

    fn text(&mut self, value: &str, field: &'static str) -> Result<(), UnwritableField> {
        push_text(&mut self.0, value).map_err(|NotXmlText| UnwritableField(field))
    }

    fn text_element(
        &mut self,
        tag: &str,
        value: &str,
        field: &'static str,
    ) -> Result<(), UnwritableField> {
        self.0.push('<');
        self.0.push_str(tag);
        self.0.push('>');
        self.text(value, field)?;
        self.0.push_str("</");
        self.0.push_str(tag);
        self.0.push('>');
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample<'a>(attributes: &'a [Attribute]) -> AssertionContent<'a> {
        AssertionContent {
            id: "_0123456789abcdef0123456789abcdef",
            issue_instant_ms: 1_795_323_921_000,
            issuer: "gateway",
            name_id: "alice",
            name_id_format: "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified",
            name_qualifier: None,
            recipient: "https://ts.example/oauth/token",
            audience: "https://ts.example",
            authn_context_class_ref: "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
            not_before_ms: 1_795_323_861_000,
            not_on_or_after_ms: 1_795_324_221_000,
            attributes,
        }
    }

    #[test]
    fn writes_the_exact_canonical_document() {
        let attrs = [Attribute {
            name: "Groups".into(),
            values: vec!["a&b".into(), "c".into()],
        }];
        let doc = write(&sample(&attrs)).unwrap();
        assert_eq!(
            doc.head,
            "<saml2:Assertion xmlns:saml2=\"urn:oasis:names:tc:SAML:2.0:assertion\" \
             ID=\"_0123456789abcdef0123456789abcdef\" IssueInstant=\"2026-11-22T05:05:21.000Z\" \
             Version=\"2.0\"><saml2:Issuer>gateway</saml2:Issuer>"
        );
        assert_eq!(
            doc.tail,
            "<saml2:Subject><saml2:NameID Format=\"urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified\">alice</saml2:NameID>\
             <saml2:SubjectConfirmation Method=\"urn:oasis:names:tc:SAML:2.0:cm:bearer\">\
             <saml2:SubjectConfirmationData NotOnOrAfter=\"2026-11-22T05:10:21.000Z\" Recipient=\"https://ts.example/oauth/token\">\
             </saml2:SubjectConfirmationData></saml2:SubjectConfirmation></saml2:Subject>\
             <saml2:Conditions NotBefore=\"2026-11-22T05:04:21.000Z\" NotOnOrAfter=\"2026-11-22T05:10:21.000Z\">\
             <saml2:AudienceRestriction><saml2:Audience>https://ts.example</saml2:Audience></saml2:AudienceRestriction></saml2:Conditions>\
             <saml2:AuthnStatement AuthnInstant=\"2026-11-22T05:05:21.000Z\" SessionIndex=\"_0123456789abcdef0123456789abcdef\">\
             <saml2:AuthnContext><saml2:AuthnContextClassRef>urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession</saml2:AuthnContextClassRef>\
             </saml2:AuthnContext></saml2:AuthnStatement>\
             <saml2:AttributeStatement><saml2:Attribute Name=\"Groups\" NameFormat=\"urn:oasis:names:tc:SAML:2.0:attrname-format:basic\">\
             <saml2:AttributeValue>a&amp;b</saml2:AttributeValue><saml2:AttributeValue>c</saml2:AttributeValue>\
             </saml2:Attribute></saml2:AttributeStatement></saml2:Assertion>"
        );
    }

    #[test]
    fn escapes_hostile_user_ids_and_refuses_unwritable_ones() {
        let mut content = sample(&[]);
        content.name_id = "<a href=\"x\">&amp;]]></a>";
        content.name_qualifier = Some("q\"\n");
        let doc = write(&content).unwrap();
        assert!(doc.tail.contains(
            "NameQualifier=\"q&quot;&#xA;\">&lt;a href=\"x\"&gt;&amp;amp;]]&gt;&lt;/a&gt;</saml2:NameID>"
        ));
        assert!(!doc.tail.contains("AttributeStatement"));
        content.name_id = "nul\u{0}";
        assert_eq!(write(&content), Err(UnwritableField("user id")));
    }
}
