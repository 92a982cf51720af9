//! A throwaway OpenLDAP `slapd` for tests: its own config, mdb database
//! and port under a temporary directory, seeded with `slapadd`, killed
//! and removed when dropped. Optionally TLS (StartTLS on the same port).

use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{free_port, wait_until};

pub const BASE: &str = "dc=example,dc=com";
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=com";
pub const ADMIN_PASSWORD: &str = "admin-secret";
/// The service account Postern searches with.
pub const SERVICE_DN: &str = "cn=postern,dc=example,dc=com";
pub const SERVICE_PASSWORD: &str = "service-secret";

pub struct Slapd {
    pub dir: PathBuf,
    pub port: u16,
    /// LDAPS, when started with TLS.
    pub ldaps_port: Option<u16>,
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// Fails loudly when slapd is missing: scripts/test installs it.
pub fn ensure_installed() {
    for tool in ["/usr/sbin/slapd", "/usr/sbin/slapadd"] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: apt-get install slapd ldap-utils (scripts/test does)"
        );
    }
}

/// An LDIF entry for a mail user under ou=people.
pub fn person(uid: &str, mail: &str, password: &str, mail_host: Option<&str>) -> String {
    let host = mail_host
        .map(|h| format!("mailHost: {h}\n"))
        .unwrap_or_default();
    format!(
        "dn: uid={uid},ou=people,{BASE}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n\
         uid: {uid}\ncn: {uid}\nsn: {uid}\nmail: {mail}\nuserPassword: {password}\n{host}\n"
    )
}

impl Slapd {
    /// Starts slapd with the base entries, the service account and
    /// `people` (LDIF from [`person`]); `tls` is (CA, cert, key).
    pub fn start(name: &str, people: &str, tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Slapd {
        ensure_installed();
        let dir =
            std::env::temp_dir().join(format!("postern-test-slapd-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("db")).unwrap();
        let tls_lines = tls
            .as_ref()
            .map(|(ca, cert, key)| {
                format!(
                    "TLSCACertificateFile {}\nTLSCertificateFile {}\nTLSCertificateKeyFile {}\n",
                    ca.display(),
                    cert.display(),
                    key.display()
                )
            })
            .unwrap_or_default();
        let conf = format!(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/inetorgperson.schema\ninclude /etc/ldap/schema/misc.schema\n\
             pidfile {d}/slapd.pid\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\n{tls_lines}\
             database mdb\nmaxsize 10485760\nsuffix \"{BASE}\"\nrootdn \"{ADMIN_DN}\"\nrootpw {ADMIN_PASSWORD}\n\
             directory {d}/db\n\
             access to attrs=userPassword by self read by anonymous auth by * none\n\
             access to * by * read\n",
            d = dir.display()
        );
        fs::write(dir.join("slapd.conf"), conf).unwrap();
        let seed = format!(
            "dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n\
             dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n\
             cn: postern\nuserPassword: {SERVICE_PASSWORD}\n\n{people}"
        );
        fs::write(dir.join("seed.ldif"), seed).unwrap();
        let out = Command::new("/usr/sbin/slapadd")
            .arg("-f")
            .arg(dir.join("slapd.conf"))
            .arg("-l")
            .arg(dir.join("seed.ldif"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "slapadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ldaps_port = tls.as_ref().map(|_| free_port());
        let mut slapd = Slapd {
            dir,
            port: 0,
            ldaps_port,
            tls,
        };
        slapd.run(free_port());
        slapd
    }

    fn run(&mut self, port: u16) {
        let mut urls = format!("ldap://127.0.0.1:{port}/");
        if let Some(ldaps) = self.ldaps_port {
            urls.push_str(&format!(" ldaps://127.0.0.1:{ldaps}/"));
        }
        let out = Command::new("/usr/sbin/slapd")
            .arg("-f")
            .arg(self.dir.join("slapd.conf"))
            .arg("-h")
            .arg(urls)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "slapd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.port = port;
        wait_until("slapd listens", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    pub fn ca(&self) -> Option<&PathBuf> {
        self.tls.as_ref().map(|t| &t.0)
    }

    fn pid(&self) -> Option<String> {
        fs::read_to_string(self.dir.join("slapd.pid"))
            .ok()
            .map(|p| p.trim().to_owned())
    }

    /// Kills slapd at once; the port stops answering when this returns.
    pub fn kill(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            let _ = fs::remove_file(self.dir.join("slapd.pid"));
        }
        wait_until("slapd gone", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", self.port)).is_err()
        });
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        let port = self.port;
        self.run(port);
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
