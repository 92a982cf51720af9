//! Test certificates: a CA and a leaf it signed, in a directory removed
//! when the test ends.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A CA and a certificate it signed for localhost and 127.0.0.1, as PEM
/// files in `dir`: (ca.pem, server.pem, server.key). The certificate also
/// serves as a client certificate.
pub fn make_pki(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("Postern test CA {tag}"));
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join(format!("{tag}-ca.pem")),
        dir.join(format!("{tag}-server.pem")),
        dir.join(format!("{tag}-server.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    paths
}

/// A test's own directory for its certificates, removed when dropped.
pub struct PkiDir(PathBuf);

impl PkiDir {
    pub fn new(name: &str) -> PkiDir {
        PkiDir(std::env::temp_dir().join(format!("postern-test-pki-{}-{name}", std::process::id())))
    }
}

impl std::ops::Deref for PkiDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for PkiDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
