//! `route …` and `acme …` (issue 14): arguments to requests.

use clap::Subcommand;
use ployz_api::{AcmeChallenge, ApiError, ErrorCode, Request, RouteTls};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum RouteCmd {
    /// Route HOSTNAME (and a path prefix) to SERVICE's PORT on every machine's gateway.
    Add {
        hostname: String,
        #[arg(long)]
        service: String,
        /// The port the service's instances listen on.
        #[arg(long)]
        port: u16,
        /// Only requests whose path starts with this prefix (longest prefix wins).
        #[arg(long)]
        path: Option<String>,
        /// `acme`: HTTPS with an ACME certificate (port 80 redirects); `off`: plain HTTP.
        #[arg(long, default_value = "off")]
        tls: TlsArg,
    },
    /// Routes, with their healthy backends and certificates.
    #[command(alias = "list")]
    Ls,
    /// Remove HOSTNAME's route for --path, or all of its routes.
    Rm {
        hostname: String,
        #[arg(long)]
        path: Option<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TlsArg {
    Acme,
    Off,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ChallengeArg {
    #[value(name = "http-01")]
    Http01,
    #[value(name = "tls-alpn-01")]
    TlsAlpn01,
}

#[derive(Subcommand)]
pub enum AcmeCmd {
    /// Set the ACME directory and contact for this network.
    Set {
        /// The CA's directory URL [default: Let's Encrypt].
        #[arg(long)]
        directory: Option<String>,
        #[arg(long)]
        email: String,
        /// PEM roots to trust for the directory (a private CA), read where ployzctl runs.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// The challenge the CA validates: http-01 (port 80) or tls-alpn-01 (port 443).
        #[arg(long, default_value = "http-01")]
        challenge: ChallengeArg,
    },
    /// The ACME settings and the stored certificates.
    Show,
}

pub fn route_request(cmd: RouteCmd) -> Request {
    match cmd {
        RouteCmd::Add {
            hostname,
            service,
            port,
            path,
            tls,
        } => Request::RouteAdd {
            host: hostname,
            path,
            service,
            port,
            tls: match tls {
                TlsArg::Acme => RouteTls::Acme,
                TlsArg::Off => RouteTls::Off,
            },
        },
        RouteCmd::Ls => Request::RouteList,
        RouteCmd::Rm { hostname, path } => Request::RouteRm {
            host: hostname,
            path,
        },
    }
}

/// `acme set` reads `--ca-file` here, where ployzctl runs; an unreadable
/// file exits 6 before any call.
pub fn acme_request(cmd: AcmeCmd, json: bool) -> Request {
    match cmd {
        AcmeCmd::Set {
            directory,
            email,
            ca_file,
            challenge,
        } => {
            let ca_pem = ca_file.map(|f| {
                std::fs::read_to_string(&f).unwrap_or_else(|e| {
                    crate::output::print_error(
                        &ApiError::new(
                            ErrorCode::InvalidArgument,
                            format!("cannot read --ca-file {}: {e}", f.display()),
                        )
                        .with_hint("give a PEM file with the CA's root certificate(s)"),
                        json,
                    );
                    std::process::exit(ErrorCode::InvalidArgument.exit_code());
                })
            });
            Request::AcmeSet {
                directory,
                email,
                ca_pem,
                challenge: match challenge {
                    ChallengeArg::Http01 => AcmeChallenge::Http01,
                    ChallengeArg::TlsAlpn01 => AcmeChallenge::TlsAlpn01,
                },
            }
        }
        AcmeCmd::Show => Request::AcmeShow,
    }
}
