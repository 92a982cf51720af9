//! OAuth 2.0 bearer tokens through Postern to a real Dovecot: JWTs signed
//! by a test key (ES256), checked against a JWKS file; XOAUTH2 and
//! OAUTHBEARER (RFC 7628), with and without an initial response, a token of
//! several KiB, the JSON error challenge on failure, and tokens refused for
//! expiry, issuer, audience, signature, algorithm, an unverified email
//! and a mismatched user.
//! Token users reach Dovecot through its master user.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::backend::DovecotBackend;
use common::client::Client;
use common::postern::{Postern, Setup, PASSWORD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;

const ISSUER: &str = "https://id.example.com";
const AUDIENCE: &str = "imap.example.com";

struct World {
    b: DovecotBackend,
    p: Postern,
    key: KeyPair,
    dir: std::path::PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JWKS document with `key` as `kid`.
fn jwks(key: &KeyPair, kid: &str) -> serde_json::Value {
    let point = key.public_key_raw();
    assert_eq!(point.len(), 65, "uncompressed P-256 point");
    serde_json::json!({ "keys": [{
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..]),
    }]})
}

fn world(name: &str) -> World {
    world_with(name, None)
}

/// With `keys`, the `oauth:` keys that say where tokens are checked
/// (`jwks_url: …`, `introspection: {…}`) instead of the JWKS file.
fn world_with(name: &str, keys: Option<&str>) -> World {
    world_options(name, keys, "")
}

/// [`world_with`] with more `oauth:` keys (`, key: value` each).
fn world_options(name: &str, keys: Option<&str>, more: &str) -> World {
    common::backend::ensure_installed();
    let b = DovecotBackend::start_with_users(
        &format!("oauth-{name}"),
        &[
            ("alice@example.com", "only-dovecot-knows"),
            ("bob@example.com", PASSWORD),
        ],
    );
    let dir =
        std::env::temp_dir().join(format!("postern-test-oauth-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = KeyPair::generate().unwrap();
    // Beside the signing key, keys Postern must skip, not choke on: one
    // for encryption and one on a curve it does not take.
    let mut set = jwks(&key, "k1");
    let extra = set["keys"].as_array_mut().unwrap();
    extra.push(
        serde_json::json!({ "kty": "RSA", "use": "enc", "alg": "RSA-OAEP", "kid": "enc1",
        "n": URL_SAFE_NO_PAD.encode([0xc5u8; 256]), "e": "AQAB" }),
    );
    extra.push(
        serde_json::json!({ "kty": "EC", "crv": "P-521", "kid": "big",
        "x": URL_SAFE_NO_PAD.encode([1u8; 66]), "y": URL_SAFE_NO_PAD.encode([2u8; 66]) }),
    );
    std::fs::write(dir.join("jwks.json"), set.to_string()).unwrap();
    std::fs::write(dir.join("master.password"), "master-secret\n").unwrap();
    let keys = match keys {
        Some(keys) => keys.to_owned(),
        None => format!("jwks_file: {}", dir.join("jwks.json").display()),
    };
    let auth = format!(
        "oauth: {{ {keys}, issuer: \"{ISSUER}\", audience: \"{AUDIENCE}\", user_claim: email{more} }}\nbrute_force: {{ max_delay: 300ms, block_after: 0 }}"
    );
    let backend = format!(
        "master_user: {{ user: proxymaster, password_file: {} }}",
        dir.join("master.password").display()
    );
    let p = Postern::start(Setup {
        backends: &[&b],
        auth_options: &auth,
        backend_options: &backend,
        ..Setup::default()
    });
    World { b, p, key, dir }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token_with(key: &KeyPair, header: Header, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_ec_der(&key.serialize_der()),
    )
    .unwrap()
}

fn es256() -> Header {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    h
}

fn claims(email: &str) -> serde_json::Value {
    serde_json::json!({ "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 300, "email": email,
        "email_verified": true })
}

fn xoauth2(user: &str, token: &str) -> String {
    STANDARD.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

fn oauthbearer(user: &str, token: &str) -> String {
    STANDARD.encode(format!(
        "n,a={user},\x01host=localhost\x01port=993\x01auth=Bearer {token}\x01\x01"
    ))
}

#[test]
fn xoauth2_logs_in_through_the_master_user() {
    let w = world("xoauth2");
    let (mut c, greeting) = Client::imaps(w.p.imaps);
    assert!(
        greeting.contains("AUTH=XOAUTH2") && greeting.contains("AUTH=OAUTHBEARER"),
        "{greeting}"
    );
    let token = token_with(&w.key, es256(), claims("Alice@Example.com"));
    let lines = c.command(
        "A1",
        &format!(
            "AUTHENTICATE XOAUTH2 {}",
            xoauth2("alice@example.com", &token)
        ),
    );
    assert!(lines.last().unwrap().starts_with("A1 OK"), "{lines:?}");
    assert_eq!(w.b.wait_logins_of("alice@example.com", 1), 1);
    assert_eq!(
        w.p.wait_metric(
            "postern_authentications_total{mechanism=\"XOAUTH2\",result=\"success\",source=\"jwt\"}",
            |v| v >= 1.0
        ),
        1.0
    );
}

#[test]
fn oauthbearer_with_a_continuation_and_a_token_of_several_kib() {
    let w = world("bearer");
    let mut big = claims("alice@example.com");
    big["groups"] = serde_json::json!(vec!["x".repeat(60); 100]);
    let token = token_with(&w.key, es256(), big);
    assert!(token.len() > 6000, "{}", token.len());
    let (mut c, _) = Client::imaps(w.p.imaps);
    c.send(b"A1 AUTHENTICATE OAUTHBEARER\r\n");
    assert_eq!(c.line(), "+ ");
    c.send(format!("{}\r\n", oauthbearer("alice@example.com", &token)).as_bytes());
    let lines = c.until_tagged("A1");
    assert!(lines.last().unwrap().starts_with("A1 OK"), "{lines:?}");
}

/// With `user_claim: email` the address must be verified: a token without
/// `email_verified` is refused, unless `allow_unverified_email` says the
/// provider's addresses can be trusted as they are; `false` never does.
#[test]
fn an_email_needs_email_verified_unless_allowed() {
    let mut missing = claims("alice@example.com");
    missing.as_object_mut().unwrap().remove("email_verified");
    let mut unverified = claims("alice@example.com");
    unverified["email_verified"] = false.into();
    let login = |w: &World, claims: &serde_json::Value| {
        let token = token_with(&w.key, es256(), claims.clone());
        token_login(
            w.p.imaps,
            &format!("XOAUTH2 {}", xoauth2("alice@example.com", &token)),
        )
    };
    let w = world("unverified-default");
    for claims in [&missing, &unverified] {
        assert_eq!(
            login(&w, claims),
            "A1 NO [AUTHENTICATIONFAILED] Authentication failed.",
            "{claims}"
        );
    }
    w.p.wait_for_log("no email_verified claim");
    let w = world_options("unverified-allowed", None, ", allow_unverified_email: true");
    assert!(login(&w, &unverified).starts_with("A1 NO [AUTHENTICATIONFAILED]"));
    let answer = login(&w, &missing);
    assert!(answer.starts_with("A1 OK"), "{answer}");
    assert_eq!(w.b.wait_logins_of("alice@example.com", 1), 1);
}

/// RFC 7628 3.2.2: a refusal is a JSON error challenge, the client sends a
/// dummy `\x01`, then the tagged NO.
#[test]
fn refused_tokens_get_the_error_challenge_then_no() {
    let w = world("refused");
    let other = KeyPair::generate().unwrap();
    let mut expired = claims("alice@example.com");
    expired["exp"] = (now() - 600).into();
    let mut wrong_aud = claims("alice@example.com");
    wrong_aud["aud"] = "someone-else".into();
    let mut unverified = claims("alice@example.com");
    unverified["email_verified"] = false.into();
    let mut wrong_iss = claims("alice@example.com");
    wrong_iss["iss"] = "https://evil.example".into();
    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("alice@example.com"),
        &EncodingKey::from_secret(b"guessable"),
    )
    .unwrap();
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#),
        URL_SAFE_NO_PAD.encode(claims("alice@example.com").to_string())
    );
    let cases = [
        ("expired", token_with(&w.key, es256(), expired)),
        ("audience", token_with(&w.key, es256(), wrong_aud)),
        ("issuer", token_with(&w.key, es256(), wrong_iss)),
        ("unverified email", token_with(&w.key, es256(), unverified)),
        (
            "signature",
            token_with(&other, es256(), claims("alice@example.com")),
        ),
        ("hs256", hs256),
        ("none", unsigned),
        ("garbage", "not.a.jwt".into()),
    ];
    for (what, token) in &cases {
        let (mut c, _) = Client::imaps(w.p.imaps);
        c.send(
            format!(
                "A1 AUTHENTICATE OAUTHBEARER {}\r\n",
                oauthbearer("alice@example.com", token)
            )
            .as_bytes(),
        );
        let challenge = c.line();
        let json = STANDARD
            .decode(
                challenge
                    .strip_prefix("+ ")
                    .unwrap_or_else(|| panic!("{what}: {challenge}")),
            )
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["status"], "invalid_token", "{what}");
        c.send(b"AQ==\r\n");
        let lines = c.until_tagged("A1");
        assert_eq!(
            lines.last().unwrap(),
            "A1 NO [AUTHENTICATIONFAILED] Authentication failed.",
            "{what}"
        );
    }
    // XOAUTH2's challenge has its own shape.
    let (mut c, _) = Client::imaps(w.p.imaps);
    let bad = token_with(&other, es256(), claims("alice@example.com"));
    c.send(
        format!(
            "A1 AUTHENTICATE XOAUTH2 {}\r\n",
            xoauth2("alice@example.com", &bad)
        )
        .as_bytes(),
    );
    let json = STANDARD
        .decode(c.line().strip_prefix("+ ").unwrap())
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(json["status"], "401");
    answer_the_challenge_and_get_no(&mut c);
    assert_eq!(
        w.p.wait_metric(
            "postern_authentications_total{mechanism=\"OAUTHBEARER\",result=\"failure\",source=\"jwt\"}",
            |v| v >= cases.len() as f64
        ),
        cases.len() as f64
    );
    // A good token last: once Dovecot has logged it, its log is written
    // past the refused ones, and it holds that login only.
    let good = token_with(&w.key, es256(), claims("alice@example.com"));
    let answer = token_login(
        w.p.imaps,
        &format!("XOAUTH2 {}", xoauth2("alice@example.com", &good)),
    );
    assert!(answer.starts_with("A1 OK"), "{answer}");
    assert_eq!(
        w.b.wait_logins(1).len(),
        1,
        "no refused token reached Dovecot"
    );
}

#[test]
fn a_token_for_one_user_does_not_log_in_another() {
    let w = world("mismatch");
    let token = token_with(&w.key, es256(), claims("alice@example.com"));
    let (mut c, _) = Client::imaps(w.p.imaps);
    c.send(
        format!(
            "A1 AUTHENTICATE XOAUTH2 {}\r\n",
            xoauth2("bob@example.com", &token)
        )
        .as_bytes(),
    );
    assert!(c.line().starts_with("+ "));
    answer_the_challenge_and_get_no(&mut c);
    // The reason is logged; the token is not.
    let log = w.p.wait_for_log("the client named bob@example.com");
    assert!(!log.contains(&token), "the token is not logged");
    // Password logins go on as before, for users the users file knows.
    let lines = c.login("bob@example.com", PASSWORD);
    assert!(
        lines.last().unwrap().starts_with("L1 NO"),
        "bob is not in the users file: {lines:?}"
    );
}

/// After an error challenge: the client's empty answer, then the NO.
fn answer_the_challenge_and_get_no(c: &mut Client) {
    c.send(b"\r\n");
    let lines = c.until_tagged("A1");
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("A1 NO [AUTHENTICATIONFAILED]"),
        "{lines:?}"
    );
}

/// The provider's keys from its `jwks_uri` (a real HTTP server), and a
/// key rotation picked up when a token names a new `kid`.
#[test]
fn keys_from_a_jwks_url_and_a_rotation() {
    let served = std::env::temp_dir().join(format!("postern-test-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&served).unwrap();
    let first = KeyPair::generate().unwrap();
    std::fs::write(served.join("jwks.json"), jwks(&first, "k1").to_string()).unwrap();
    let port = common::free_port();
    let mut server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
            "--directory",
        ])
        .arg(&served)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 runs");
    common::wait_until("the JWKS server", common::SETTLE, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let w = world_with(
        "jwks-url",
        Some(&format!("jwks_url: \"http://127.0.0.1:{port}/jwks.json\"")),
    );
    let login = |key: &KeyPair, kid: &str| {
        let mut header = es256();
        header.kid = Some(kid.into());
        let token = token_with(key, header, claims("alice@example.com"));
        token_login(
            w.p.imaps,
            &format!("XOAUTH2 {}", xoauth2("alice@example.com", &token)),
        )
    };
    assert!(
        login(&first, "k1").starts_with("A1 OK"),
        "keys fetched at start"
    );
    // The provider rotates to k2; a token naming k2 makes Postern fetch
    // again (at most every 10 s). Replaced whole, so the server never
    // serves a half-written file.
    let second = KeyPair::generate().unwrap();
    let rotated = served.join("jwks.json.new");
    std::fs::write(&rotated, jwks(&second, "k2").to_string()).unwrap();
    std::fs::rename(&rotated, served.join("jwks.json")).unwrap();
    common::wait_until(
        "the rotated key is fetched",
        // The 10 s between fetches, then the usual allowance.
        Duration::from_secs(10) + common::SETTLE,
        || login(&second, "k2").starts_with("A1 OK"),
    );
    assert!(
        login(&first, "k1").starts_with("A1 NO"),
        "the old key is gone"
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&served);
}

/// Opaque tokens checked at an RFC 7662 introspection endpoint (a real
/// HTTP server) with HTTP Basic client credentials: active tokens for our
/// issuer and audience get in; inactive, foreign or expired ones do not;
/// a dead endpoint is "unavailable".
#[test]
fn opaque_tokens_by_introspection() {
    let dir = std::env::temp_dir().join(format!("postern-test-introspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = serde_json::json!({ "active": true, "email": "alice@example.com",
        "email_verified": true, "iss": ISSUER, "aud": [AUDIENCE, "webmail"], "exp": now() + 300 });
    let config = serde_json::json!({
        "client": "postern:intro-secret",
        "tokens": {
            "opaque-good": good,
            "opaque-revoked": { "active": false, "email": "alice@example.com" },
            "opaque-elsewhere": { "active": true, "email": "alice@example.com", "aud": "webmail" },
            "opaque-expired": { "active": true, "email": "alice@example.com", "exp": now() - 600 },
            "opaque-foreign": { "active": true, "email": "alice@example.com", "iss": "https://evil.example", "aud": AUDIENCE },
            "opaque-anyone": { "active": true, "email": "alice@example.com" },
        },
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("secret"), "intro-secret\n").unwrap();
    let mut server = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/introspection_server.py"
        ))
        .arg(dir.join("config.json"))
        .arg(dir.join("port"))
        .arg(dir.join("requests.log"))
        .spawn()
        .expect("python3 runs");
    let mut port = String::new();
    common::wait_until("the introspection endpoint", common::SETTLE, || {
        port = std::fs::read_to_string(dir.join("port")).unwrap_or_default();
        !port.is_empty()
    });
    let keys = format!(
        "introspection: {{ url: \"http://127.0.0.1:{port}/introspect\", client_id: postern, client_secret_file: {} }}",
        dir.join("secret").display()
    );
    let w = world_with("introspect", Some(&keys));
    let login = |token: &str| {
        token_login(
            w.p.imaps,
            &format!("OAUTHBEARER {}", oauthbearer("alice@example.com", token)),
        )
    };
    assert!(login("opaque-good").starts_with("A1 OK"));
    assert_eq!(w.b.wait_logins_of("alice@example.com", 1), 1);
    for token in [
        "opaque-revoked",
        "opaque-elsewhere",
        "opaque-expired",
        "opaque-foreign",
        "opaque-anyone",
        "unknown",
    ] {
        assert_eq!(
            login(token),
            "A1 NO [AUTHENTICATIONFAILED] Authentication failed.",
            "{token}"
        );
    }
    let log = std::fs::read_to_string(dir.join("requests.log")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["authorization"],
        format!("Basic {}", STANDARD.encode("postern:intro-secret"))
    );
    assert_eq!(first["form"]["token"][0], "opaque-good");
    assert_eq!(first["form"]["token_type_hint"][0], "access_token");
    assert_eq!(first["content_type"], "application/x-www-form-urlencoded");
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        login("opaque-good").starts_with("A1 NO [UNAVAILABLE]"),
        "endpoint down"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `AUTHENTICATE <mechanism and initial response>` on a new connection;
/// an error challenge is answered with the dummy response. The tagged
/// answer, or the first line if the exchange ended at once.
fn token_login(port: u16, authenticate: &str) -> String {
    let (mut c, _) = Client::imaps(port);
    c.send(format!("A1 AUTHENTICATE {authenticate}\r\n").as_bytes());
    let first = c.line();
    if first.starts_with("+ ") {
        c.send(b"AQ==\r\n");
        return c.until_tagged("A1").last().unwrap().clone();
    }
    first
}

/// Tokens over submission and ManageSieve: the same checks, the words of
/// each protocol, the master user at the backend.
#[test]
fn tokens_log_in_over_submission_and_managesieve() {
    use common::client::{tcp, tls_over};
    use std::io::{BufRead, BufReader, Write};
    let mta = common::postfix::PostfixServer::start("oauth-sub");
    let b = DovecotBackend::start_services(
        "oauth-services",
        &[("alice@example.com", "only-dovecot-knows")],
        &[],
        &mta.addr(),
    );
    let dir = std::env::temp_dir().join(format!(
        "postern-test-oauth-{}-services",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("jwks.json"), jwks(&key, "k1").to_string()).unwrap();
    std::fs::write(dir.join("master.password"), "master-secret\n").unwrap();
    let auth = format!(
        "oauth: {{ jwks_file: {}, issuer: \"{ISSUER}\", audience: \"{AUDIENCE}\", user_claim: email }}",
        dir.join("jwks.json").display()
    );
    let backend = format!(
        "master_user: {{ user: proxymaster, password_file: {} }}",
        dir.join("master.password").display()
    );
    let p = Postern::start(Setup {
        backends: &[&b],
        auth_options: &auth,
        backend_options: &backend,
        submission: true,
        sieve: true,
        ..Setup::default()
    });
    let token = token_with(&key, es256(), claims("alice@example.com"));

    // Submission over implicit TLS: XOAUTH2 with an initial response.
    let tls = tls_over(tcp(p.submissions), "localhost", &[b"smtp"]).unwrap();
    let mut c = Client::from_stream(tls);
    assert!(c.line().starts_with("220 "));
    c.send(b"EHLO client.example\r\n");
    let mut ehlo = Vec::new();
    loop {
        let l = c.line();
        let last = l.as_bytes()[3] == b' ';
        ehlo.push(l);
        if last {
            break;
        }
    }
    assert!(
        ehlo.iter()
            .any(|l| l.contains("AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2")),
        "{ehlo:?}"
    );
    c.send(format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice@example.com", &token)).as_bytes());
    assert_eq!(c.line(), "235 2.7.0 Authentication successful");
    b.wait_log("submission-login: Info: Login: user=<alice@example.com>");
    // A refused token: the error challenge, then 535.
    let tls = tls_over(tcp(p.submissions), "localhost", &[b"smtp"]).unwrap();
    let mut c = Client::from_stream(tls);
    c.line();
    c.send(b"EHLO client.example\r\n");
    while c.line().as_bytes()[3] != b' ' {}
    let forged = token_with(
        &KeyPair::generate().unwrap(),
        es256(),
        claims("alice@example.com"),
    );
    c.send(
        format!(
            "AUTH OAUTHBEARER {}\r\n",
            oauthbearer("alice@example.com", &forged)
        )
        .as_bytes(),
    );
    assert!(c.line().starts_with("334 "), "the JSON error challenge");
    c.send(b"AQ==\r\n");
    assert!(c.line().starts_with("535 5.7.8"));

    // ManageSieve: OAUTHBEARER after STARTTLS.
    let s = tcp(p.sieve);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("OK") {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    (&s).write_all(b"STARTTLS\r\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK"), "{line}");
    let mut c = Client::from_stream(tls_over(s, "localhost", &[b"managesieve"]).unwrap());
    let mut caps = Vec::new();
    loop {
        let l = c.line();
        let done = l.starts_with("OK");
        caps.push(l);
        if done {
            break;
        }
    }
    assert!(
        caps.iter()
            .any(|l| l == "\"SASL\" \"PLAIN LOGIN OAUTHBEARER XOAUTH2\""),
        "{caps:?}"
    );
    c.send(
        format!(
            "AUTHENTICATE \"OAUTHBEARER\" \"{}\"\r\n",
            oauthbearer("alice@example.com", &token)
        )
        .as_bytes(),
    );
    assert_eq!(c.line(), "OK \"Logged in.\"");
    b.wait_log("managesieve-login: Info: Login: user=<alice@example.com>");
    let _ = std::fs::remove_dir_all(&dir);
}
