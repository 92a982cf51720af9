//! DNS discovery against a name server the test controls: a DNS name with
//! one A record per Dovecot backend (as a Kubernetes headless Service has
//! one per pod) is a pool; adding a record adds a member without a
//! restart, removing one retires it.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::{Arc, Mutex};

use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{user, Postern, Setup, PASSWORD};

/// A UDP DNS server on 127.0.0.1 answering A queries for any name with the
/// current `records` (TTL 0), and AAAA queries with no records. It serves
/// until the test process ends.
fn dns_server(records: Arc<Mutex<Vec<Ipv4Addr>>>) -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            if let Some(answer) = answer(&buf[..n], &records.lock().unwrap()) {
                let _ = socket.send_to(&answer, from);
            }
        }
    });
    port
}

/// The response to one query: header, the question echoed, answers.
fn answer(query: &[u8], records: &[Ipv4Addr]) -> Option<Vec<u8>> {
    // The question's name: length-prefixed labels up to a zero byte.
    let mut at = 12;
    while *query.get(at)? != 0 {
        at += 1 + query[at] as usize;
    }
    let question_end = at + 5; // zero byte, QTYPE, QCLASS
    let qtype = u16::from_be_bytes([*query.get(at + 1)?, *query.get(at + 2)?]);
    let answers: &[Ipv4Addr] = if qtype == 1 { records } else { &[] };
    let mut out = Vec::with_capacity(question_end + 16 * answers.len());
    out.extend_from_slice(&query[..2]); // id
    out.extend_from_slice(&[0x81, 0x80]); // response, recursion desired and available, NOERROR
    out.extend_from_slice(&[0, 1]); // one question
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // no authority or additional records
    out.extend_from_slice(query.get(12..question_end)?);
    for ip in answers {
        out.extend_from_slice(&[0xc0, 12]); // the name, by pointer to the question
        out.extend_from_slice(&[0, 1, 0, 1]); // A, IN
        out.extend_from_slice(&[0, 0, 0, 0]); // TTL 0
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

#[test]
fn members_follow_the_dns_records() {
    common::backend::ensure_installed();
    let (two, three) = ("disc-127.0.0.2", "disc-127.0.0.3");
    let to_three = common::user_preferring(&[two, three], three);
    let to_two = common::user_preferring(&[two, three], two);
    let creds = [(to_three.as_str(), PASSWORD), (to_two.as_str(), PASSWORD)];
    let port = common::free_port();
    let b2 = DovecotBackend::start_at("disc-2", &creds, "127.0.0.2", port);
    let b3 = DovecotBackend::start_at("disc-3", &creds, "127.0.0.3", port);

    let records = Arc::new(Mutex::new(vec![Ipv4Addr::new(127, 0, 0, 2)]));
    let dns = dns_server(Arc::clone(&records));
    let p = Postern::start(Setup {
        pool_lines: &format!(
            "    - {{ name: disc, address: \"imap.mail.test:{port}\", discover: true }}\n"
        ),
        users: &(user(&to_three) + &user(&to_two)),
        backend_options: &format!(
            "discovery: {{ interval: 200ms, nameserver: \"127.0.0.1:{dns}\" }}\nhealth_check: {{ interval: 200ms }}"
        ),
        ..Setup::default()
    });
    let login = |name: &str| assert!(Client::login_ok(p.imaps, name), "{name}");
    // Discovered before the process said it was ready: one member.
    login(&to_three);
    assert_eq!(
        b2.wait_logins_of(&to_three, 1),
        1,
        "the only member takes the login"
    );

    // Scaled up: a second record, a second member, no restart.
    records.lock().unwrap().push(Ipv4Addr::new(127, 0, 0, 3));
    p.wait_metric(&format!("postern_backend_up{{backend=\"{three}\"}}"), |v| {
        v == 1.0
    });
    login(&to_three);
    assert_eq!(
        b3.wait_logins_of(&to_three, 1),
        1,
        "its users go to the new member"
    );

    // Scaled down: the first record goes; its users move.
    records.lock().unwrap().retain(|ip| ip.octets()[3] != 2);
    p.wait_for_log("backend no longer in DNS; retired");
    login(&to_two);
    assert_eq!(
        b3.wait_logins_of(&to_two, 1),
        1,
        "the remaining member takes everyone"
    );
    b2.settle_log();
    assert_eq!(b2.logins_of(&to_two), 0);
    p.wait_for_log("backend discovered");
}
