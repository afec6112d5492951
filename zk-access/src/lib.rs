//! How zklb's processes reach ZooKeeper: over TLS (mutual, when a client certificate is given),
//! authenticated with a digest identity, and which ACLs what they write carries.
//!
//! The control plane and the agent take the same flags (and the same `ZKLB_ZOOKEEPER_*`
//! variables), so one deployment's secrets are configured once. Files are read and checked at
//! start, before ZooKeeper is contacted, so a mistake is a message, not a failing session.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use zookeeper_client::{Acl, AuthId, Client, Connector, Permission, TlsOptions};

/// The flags that say how to reach ZooKeeper securely.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AccessArgs {
    /// A file holding `user:password`: the digest identity this process authenticates as (and,
    /// for what it writes, the identity with every permission).
    #[arg(long, env = "ZKLB_ZOOKEEPER_DIGEST_FILE")]
    pub zookeeper_digest_file: Option<PathBuf>,
    /// PEM file of the CA certificates ZooKeeper's must chain to: connect over TLS (servers in
    /// the connect string without `tcp://` use TLS).
    #[arg(long, env = "ZKLB_ZOOKEEPER_TLS_CA")]
    pub zookeeper_tls_ca: Option<PathBuf>,
    /// PEM file of this process's client certificate, for servers that ask for one.
    #[arg(long, env = "ZKLB_ZOOKEEPER_TLS_CERT", requires = "zookeeper_tls_key")]
    pub zookeeper_tls_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(long, env = "ZKLB_ZOOKEEPER_TLS_KEY", requires = "zookeeper_tls_cert")]
    pub zookeeper_tls_key: Option<PathBuf>,
}

/// Why the access settings cannot be used, naming the flag and the file.
#[derive(Debug, Error)]
pub enum AccessError {
    #[error("--{flag} {}: cannot read it: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--{flag} {}: {reason}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "--zookeeper-tls-cert needs --zookeeper-tls-ca: a client certificate is only sent over TLS"
    )]
    CertificateWithoutTls,
}

/// The access settings, read and checked.
#[derive(Debug, Clone, Default)]
pub struct Access {
    digest: Option<String>,
    tls: Option<TlsOptions>,
}

impl Access {
    pub fn load(args: &AccessArgs) -> Result<Access, AccessError> {
        let digest = match &args.zookeeper_digest_file {
            Some(path) => Some(digest(path)?),
            None => None,
        };
        let tls = match (&args.zookeeper_tls_ca, &args.zookeeper_tls_cert) {
            (None, Some(_)) => return Err(AccessError::CertificateWithoutTls),
            (None, None) => None,
            (Some(ca), _) => {
                let invalid = |flag, path: &Path| {
                    let path = path.to_path_buf();
                    move |error: zookeeper_client::Error| AccessError::Invalid {
                        flag,
                        path,
                        reason: error.to_string(),
                    }
                };
                let pem = read("zookeeper-tls-ca", ca)?;
                let mut options = TlsOptions::new()
                    .with_pem_ca(&pem)
                    .map_err(invalid("zookeeper-tls-ca", ca))?;
                if let (Some(cert), Some(key)) = (&args.zookeeper_tls_cert, &args.zookeeper_tls_key)
                {
                    let certificate = read("zookeeper-tls-cert", cert)?;
                    let private_key = read("zookeeper-tls-key", key)?;
                    options = options
                        .with_pem_identity(&certificate, &private_key)
                        .map_err(invalid("zookeeper-tls-key", key))?;
                }
                Some(options)
            }
        };
        Ok(Access { digest, tls })
    }

    /// Whether this process authenticates with a digest identity.
    pub fn authenticates(&self) -> bool {
        self.digest.is_some()
    }

    /// Opens a session to `connect` with these settings.
    pub async fn connect(
        &self,
        connect: &str,
        session_timeout: Duration,
    ) -> Result<Client, zookeeper_client::Error> {
        let mut connector: Connector = Client::connector().with_session_timeout(session_timeout);
        if let Some(digest) = &self.digest {
            connector = connector.with_auth("digest", digest.as_bytes());
        }
        match &self.tls {
            Some(tls) => {
                connector
                    .with_tls(tls.clone())
                    .secure_connect(connect)
                    .await
            }
            None => connector.connect(connect).await,
        }
    }

    /// The ACL of what this process writes: every permission for its own identity when it
    /// authenticates (anyone's otherwise), and reading for `readers`.
    pub fn acls(&self, readers: &[ReadAcl]) -> Vec<Acl> {
        let owner = if self.authenticates() {
            AuthId::authed()
        } else {
            AuthId::anyone()
        };
        let mut acls = vec![(owner, Permission::ALL)];
        acls.extend(
            readers
                .iter()
                .map(|reader| (reader.0.clone(), Permission::READ)),
        );
        merged(acls)
    }

    /// The ACL of a directory this process creates on the way to what it writes (a service's
    /// znode): as [`Access::acls`], and anyone may create in it, so that registrars of other
    /// identities can register beside this one.
    pub fn directory_acls(&self, readers: &[ReadAcl]) -> Vec<Acl> {
        let mut acls: Vec<(AuthId, Permission)> = self
            .acls(readers)
            .into_iter()
            .map(|acl| (acl.auth_id().clone(), acl.permission()))
            .collect();
        acls.push((AuthId::anyone(), Permission::CREATE));
        merged(acls)
    }
}

/// An identity allowed to read what is written: `world:anyone`, `digest:<user>:<hash>` (as
/// ZooKeeper's `DigestAuthenticationProvider` makes it), `ip:<address>[/<bits>]`,
/// `x509:<distinguished name>`, `sasl:<principal>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAcl(AuthId);

impl std::str::FromStr for ReadAcl {
    type Err = String;

    fn from_str(acl: &str) -> Result<ReadAcl, String> {
        let (scheme, id) = acl
            .split_once(':')
            .filter(|(_, id)| !id.is_empty())
            .ok_or_else(|| format!("{acl:?} is not <scheme>:<id>, such as world:anyone"))?;
        let valid = match scheme {
            "world" => id == "anyone",
            "digest" => id
                .split_once(':')
                .is_some_and(|(user, hash)| !user.is_empty() && !hash.is_empty()),
            "ip" | "x509" | "sasl" => true,
            _ => false,
        };
        if !valid {
            return Err(format!(
                "{acl:?} is not world:anyone, digest:<user>:<hash>, ip:<address>, x509:<name> or sasl:<principal>"
            ));
        }
        Ok(ReadAcl(AuthId::new(scheme, id)))
    }
}

impl ReadAcl {
    pub fn anyone() -> ReadAcl {
        ReadAcl(AuthId::anyone())
    }
}

/// One entry per identity, with the union of its permissions.
fn merged(acls: Vec<(AuthId, Permission)>) -> Vec<Acl> {
    let mut merged: Vec<(AuthId, Permission)> = Vec::new();
    for (id, permission) in acls {
        match merged.iter_mut().find(|(known, _)| *known == id) {
            Some((_, known)) => *known = *known | permission,
            None => merged.push((id, permission)),
        }
    }
    merged
        .into_iter()
        .map(|(id, permission)| Acl::new(permission, id))
        .collect()
}

fn read(flag: &'static str, path: &Path) -> Result<String, AccessError> {
    std::fs::read_to_string(path).map_err(|source| AccessError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

/// `user:password` from a file (a trailing newline is not part of the password).
fn digest(path: &Path) -> Result<String, AccessError> {
    let text = read("zookeeper-digest-file", path)?;
    let credentials = text.trim_end_matches(['\n', '\r']);
    match credentials.split_once(':') {
        Some((user, password)) if !user.is_empty() && !password.is_empty() => {
            Ok(credentials.to_string())
        }
        _ => Err(AccessError::Invalid {
            flag: "zookeeper-digest-file",
            path: path.to_path_buf(),
            reason: "holds no user:password".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("writing a file");
        path
    }

    #[test]
    fn a_digest_file_holds_user_and_password() {
        let dir = tempfile::tempdir().expect("a directory");
        let args = |path| AccessArgs {
            zookeeper_digest_file: Some(path),
            ..AccessArgs::default()
        };
        let good = file(dir.path(), "good", "agent:s3cr:et\n");
        let access = Access::load(&args(good)).expect("loads");
        assert_eq!(access.digest.as_deref(), Some("agent:s3cr:et"));
        assert!(access.authenticates());
        let bad = file(dir.path(), "bad", "no-colon\n");
        let error = Access::load(&args(bad)).expect_err("refused").to_string();
        assert!(error.contains("--zookeeper-digest-file") && error.contains("no user:password"));
        let error = Access::load(&args(dir.path().join("missing")))
            .expect_err("refused")
            .to_string();
        assert!(error.contains("cannot read it"), "{error}");
    }

    #[test]
    fn tls_files_are_checked_at_start() {
        let dir = tempfile::tempdir().expect("a directory");
        let garbage = file(dir.path(), "ca.pem", "not a certificate");
        let error = Access::load(&AccessArgs {
            zookeeper_tls_ca: Some(garbage),
            ..AccessArgs::default()
        })
        .expect_err("refused")
        .to_string();
        assert!(error.contains("--zookeeper-tls-ca"), "{error}");
        let cert = file(dir.path(), "cert.pem", "");
        let error = Access::load(&AccessArgs {
            zookeeper_tls_cert: Some(cert.clone()),
            zookeeper_tls_key: Some(cert),
            ..AccessArgs::default()
        })
        .expect_err("refused");
        assert!(matches!(error, AccessError::CertificateWithoutTls));
    }

    #[test]
    fn read_acls_name_a_scheme_and_an_id() {
        for good in [
            "world:anyone",
            "digest:reader:Gx2Fk0Qc1n7P1D5zJ6oXqZ0s8mE=",
            "ip:10.0.0.0/8",
            "x509:CN=control-plane",
        ] {
            assert!(good.parse::<ReadAcl>().is_ok(), "{good}");
        }
        for bad in [
            "anyone",
            "world:everyone",
            "digest:reader",
            "magic:x",
            "ip:",
        ] {
            assert!(bad.parse::<ReadAcl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn writes_belong_to_the_writer_and_are_readable_by_readers() {
        let anonymous = Access::default();
        let acls = anonymous.acls(&[]);
        assert_eq!(acls, [Acl::new(Permission::ALL, AuthId::anyone())]);
        let authenticated = Access {
            digest: Some("agent:pw".into()),
            tls: None,
        };
        let reader: ReadAcl = "digest:reader:hash".parse().expect("an ACL");
        let readers = [ReadAcl::anyone(), reader];
        let acls = authenticated.acls(&readers);
        assert_eq!(acls[0], Acl::new(Permission::ALL, AuthId::authed()));
        assert_eq!(acls[1], Acl::new(Permission::READ, AuthId::anyone()));
        assert_eq!(acls.len(), 3);
        let directory = authenticated.directory_acls(&readers);
        assert_eq!(
            directory[1],
            Acl::new(Permission::READ | Permission::CREATE, AuthId::anyone()),
            "one entry per identity"
        );
        assert_eq!(directory.len(), 3);
        assert_eq!(
            anonymous.directory_acls(&[ReadAcl::anyone()]),
            [Acl::new(Permission::ALL, AuthId::anyone())]
        );
    }
}
