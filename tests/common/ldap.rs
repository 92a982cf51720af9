//! A throwaway OpenLDAP `slapd` for tests: its own config, mdb database
//! and port under a temporary directory, seeded with `slapadd`, killed
//! and removed when dropped. Optionally TLS (StartTLS on the same port).

use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;

use super::{free_port, wait_for, wait_until, SETTLE};

pub const BASE: &str = "dc=example,dc=com";
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=com";
pub const ADMIN_PASSWORD: &str = "admin-secret";
/// The service account Postern searches with.
pub const SERVICE_DN: &str = "cn=postern,dc=example,dc=com";
pub const SERVICE_PASSWORD: &str = "service-secret";
/// How often `start` picks new ports after slapd failed to start (most
/// likely a port taken since `free_port` released it).
const PORT_ATTEMPTS: usize = 3;

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
    person_with(uid, mail, password, &host)
}

/// Like [`person`], with more attribute lines (`employeeType: disabled\n`;
/// attributes of inetOrgPerson or inetLocalMailRecipient).
pub fn person_with(uid: &str, mail: &str, password: &str, lines: &str) -> String {
    format!(
        "dn: uid={uid},ou=people,{BASE}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n\
         uid: {uid}\ncn: {uid}\nsn: {uid}\nmail: {mail}\nuserPassword: {password}\n{lines}\n"
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
        let mut slapd = Slapd {
            dir,
            port: 0,
            ldaps_port: None,
            tls,
        };
        let mut failed = String::new();
        for _ in 0..PORT_ATTEMPTS {
            slapd.ldaps_port = slapd.tls.as_ref().map(|_| free_port());
            match slapd.run(free_port()) {
                Ok(()) => return slapd,
                Err(stderr) => failed = stderr,
            }
        }
        panic!("slapd did not start in {PORT_ATTEMPTS} attempts: {failed}");
    }

    /// Starts slapd on `port` (and `ldaps_port`) and waits until it
    /// answers on them; slapd's stderr if it did not start.
    fn run(&mut self, port: u16) -> Result<(), String> {
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
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        self.port = port;
        // Bound before it detached, but listening only once its daemon
        // thread runs.
        wait_until("slapd listens", SETTLE, || {
            self.ports()
                .iter()
                .all(|&p| TcpStream::connect(("127.0.0.1", p)).is_ok())
        });
        Ok(())
    }

    /// The plain port and, with TLS, the LDAPS port.
    fn ports(&self) -> Vec<u16> {
        std::iter::once(self.port).chain(self.ldaps_port).collect()
    }

    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    pub fn ca(&self) -> Option<&PathBuf> {
        self.tls.as_ref().map(|t| &t.0)
    }

    /// The pid in slapd's pid file, once it holds a whole one.
    fn pid(&self) -> Option<String> {
        fs::read_to_string(self.dir.join("slapd.pid"))
            .ok()
            .map(|p| p.trim().to_owned())
            .filter(|p| p.parse::<u32>().is_ok())
    }

    /// Kills slapd at once; the ports stop answering when this returns.
    pub fn kill(&self) {
        // The detached slapd writes its pid file on its own time: wait for
        // it rather than kill nothing.
        let pid = wait_for("slapd's pid file", SETTLE, || self.pid(), Option::is_some).unwrap();
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        let _ = fs::remove_file(self.dir.join("slapd.pid"));
        wait_until("slapd gone", SETTLE, || {
            self.ports()
                .iter()
                .all(|&p| TcpStream::connect(("127.0.0.1", p)).is_err())
        });
    }

    /// Starts it again on the same ports.
    pub fn restart(&mut self) {
        let port = self.port;
        if let Err(stderr) = self.run(port) {
            panic!("slapd did not restart on port {port}: {stderr}");
        }
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
