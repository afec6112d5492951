//! A certificate authority of the test's own, made with the openssl command, for TLS between
//! the test's processes.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA's certificate and key, in a directory of the test's.
pub struct Pki {
    dir: PathBuf,
    pub ca: PathBuf,
    ca_key: PathBuf,
}

/// A certificate signed by the CA, with its key (PKCS#8, unencrypted), as PEM files.
pub struct Issued {
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// The key and the certificate in one file, as Java's PEM key stores take them.
    pub key_and_certificate: PathBuf,
}

fn openssl(arguments: &[&str]) {
    let output = Command::new("openssl")
        .args(arguments)
        .output()
        .expect("running openssl");
    assert!(
        output.status.success(),
        "openssl {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).expect("creating the PKI directory");
        let ca = dir.join("ca.pem");
        let ca_key = dir.join("ca.key");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=zklb test CA",
            "-keyout",
            path(&ca_key),
            "-out",
            path(&ca),
        ]);
        Pki { dir, ca, ca_key }
    }

    /// A certificate for `name`, valid for the IP address 127.0.0.1 (a server's, or a client's).
    pub fn issue(&self, name: &str) -> Issued {
        let key = self.dir.join(format!("{name}.key"));
        let request = self.dir.join(format!("{name}.csr"));
        let certificate = self.dir.join(format!("{name}.pem"));
        let extensions = self.dir.join(format!("{name}.ext"));
        std::fs::write(&extensions, "subjectAltName=IP:127.0.0.1\n").expect("writing extensions");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            path(&key),
            "-out",
            path(&request),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            path(&request),
            "-CA",
            path(&self.ca),
            "-CAkey",
            path(&self.ca_key),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            path(&extensions),
            "-out",
            path(&certificate),
        ]);
        let key_and_certificate = self.dir.join(format!("{name}-bundle.pem"));
        let bundle = std::fs::read_to_string(&key).expect("the key")
            + &std::fs::read_to_string(&certificate).expect("the certificate");
        std::fs::write(&key_and_certificate, bundle).expect("writing the bundle");
        Issued {
            certificate,
            key,
            key_and_certificate,
        }
    }
}
