//! `pp`: the operator's command for principal-propagation (native, not part of the
//! plugin). One binary, one subcommand per job:
//!
//! ```text
//! pp keys generate|renew|sample-certificate ...   the gateway's signing keys and CAs
//! pp assertion --config <plugin.json> --destination <name> (--claims <JSON> | --jwt <JWT>)
//!              [--exchange true]                   the assertion and token request the gateway would send
//! pp check (--cert <pem> | --config … --destination …) [expectations] <file or ->
//!                                                  every rule a target applies to an assertion
//! pp config --destination <exported.json> --idp-issuer <iss> --idp-jwks <url>
//!                                                  a complete Envoy configuration for it
//! ```
//!
//! `pp <command> --help` explains each. Errors go to stderr with exit status 2; a check
//! with a failed rule exits with 1.

#[cfg(not(target_arch = "wasm32"))]
mod assertion;
#[cfg(not(target_arch = "wasm32"))]
mod check;
#[cfg(not(target_arch = "wasm32"))]
mod config;
#[cfg(not(target_arch = "wasm32"))]
mod keys;

use std::collections::HashMap;

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest.to_vec()),
        None => ("help", Vec::new()),
    };
    let wants_help = rest.iter().any(|a| a == "--help" || a == "-h");
    let outcome = match command {
        "keys" if wants_help || rest.is_empty() => Ok(keys::usage()),
        "keys" => keys::run(rest),
        "assertion" if wants_help => Ok(assertion::USAGE.to_string()),
        "assertion" => assertion::run(&rest),
        "config" if wants_help => Ok(config::USAGE.to_string()),
        "config" => config::run(&rest),
        "check" if wants_help => Ok(check::USAGE.to_string()),
        "check" => match check::run(&rest) {
            Ok(report) if report.passed => Ok(report.text),
            Ok(report) => {
                println!("{}", report.text);
                return std::process::ExitCode::from(1);
            }
            Err(problem) => Err(problem),
        },
        "help" | "--help" | "-h" => Ok(USAGE.to_string()),
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match outcome {
        Ok(message) => {
            println!("{message}");
            std::process::ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("pp {command}: {message}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(target_arch = "wasm32")]
fn main() {}

const USAGE: &str = "usage: pp <command> [options]   (pp <command> --help for each)

commands:
  keys       generate, renew or sample the gateway's signing keys and client-certificate CAs
  assertion  print the assertion and the token request the gateway would send for a user
  check      check an assertion (the gateway's or an identity provider's) rule by rule
  config     write a complete Envoy configuration for a destination exported from the BTP cockpit";

/// `--name value` pairs; every option takes a value.
pub fn parse_options(args: &[String]) -> Result<HashMap<String, String>, String> {
    let mut options = HashMap::new();
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {flag:?}"))?;
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if options.insert(name.to_string(), value.clone()).is_some() {
            return Err(format!("{flag} is given twice"));
        }
    }
    Ok(options)
}
