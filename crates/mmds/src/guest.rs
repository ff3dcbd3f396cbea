//! What the guest sees over HTTP: `GET` of a path in the data store (IMDS
//! text, or JSON with `Accept: application/json`), and V2 session tokens
//! from `PUT /latest/api/token`. Status codes and messages follow
//! Firecracker's MMDS.

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use kiln_api::http::Request;
use kiln_api::models::MmdsVersion;

use crate::store::{imds_text, normalize};
use crate::Mmds;

const TTL_HEADERS: [&str; 2] = [
    "X-metadata-token-ttl-seconds",
    "X-aws-ec2-metadata-token-ttl-seconds",
];
const TOKEN_HEADERS: [&str; 2] = ["X-metadata-token", "X-aws-ec2-metadata-token"];
/// Longest token lifetime, seconds.
pub const MAX_TTL: u32 = 21600;

/// An answer to the guest.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `text/plain` or `application/json`.
    pub content_type: &'static str,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    pub(crate) fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain",
            headers: Vec::new(),
            body: body.into().into_bytes(),
        }
    }

    /// The response on the wire; `close` adds `Connection: close`.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: Firecracker API\r\nConnection: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            if close { "close" } else { "keep-alive" },
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        501 => "Not Implemented",
        _ => "",
    }
}

/// V2 session tokens, stateless: the expiry (milliseconds on this
/// process's clock) and an HMAC-SHA256 of it under a key drawn at start,
/// in hex. Nothing is stored per token, so no guest can crowd out another's
/// tokens, and they all die with the process (a restored VM needs new ones,
/// as in Firecracker).
#[derive(Debug)]
pub struct Tokens {
    key: Option<[u8; 32]>,
    epoch: Instant,
}

/// Hex digits in a token: 16 for the expiry, 32 for the truncated MAC.
pub const TOKEN_LEN: usize = 48;

impl Default for Tokens {
    fn default() -> Self {
        let mut key = [0u8; 32];
        let key = match fill_random(&mut key) {
            Ok(()) => Some(key),
            Err(e) => {
                log::warn!("mmds: no key for session tokens: {e}");
                None
            }
        };
        Self {
            key,
            epoch: Instant::now(),
        }
    }
}

impl Tokens {
    fn mac(&self, expiry: u64) -> Option<Hmac<Sha256>> {
        let mut m = Hmac::<Sha256>::new_from_slice(self.key.as_ref()?).ok()?;
        m.update(&expiry.to_be_bytes());
        Some(m)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A new token valid for `ttl`.
    pub fn issue(&self, ttl: Duration) -> std::io::Result<String> {
        let expiry = self.now_ms() + ttl.as_millis() as u64;
        let mac = self
            .mac(expiry)
            .ok_or_else(|| std::io::Error::other("no key for session tokens"))?
            .finalize()
            .into_bytes();
        let mut t = format!("{expiry:016x}");
        for b in &mac[..16] {
            t.push_str(&format!("{b:02x}"));
        }
        Ok(t)
    }

    /// Whether `token` was issued here and has not expired.
    pub fn valid(&self, token: &str) -> bool {
        if token.len() != TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
        let Ok(expiry) = u64::from_str_radix(&token[..16], 16) else {
            return false;
        };
        let tag: Option<Vec<u8>> = (16..TOKEN_LEN)
            .step_by(2)
            .map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok())
            .collect();
        let (Some(tag), Some(mac)) = (tag, self.mac(expiry)) else {
            return false;
        };
        mac.verify_truncated_left(&tag).is_ok() && expiry > self.now_ms()
    }
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `buf.len() - done` bytes into the
        // rest of `buf`, which is valid for writes of that length.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Answers one guest request.
pub fn answer(mmds: &Mmds, req: &Request) -> Answer {
    match req.method.as_str() {
        "GET" => get(mmds, req),
        "PUT" => put_token(mmds, req),
        "PATCH" | "DELETE" => {
            let mut a = Answer::text(405, "Not allowed HTTP method.");
            a.headers.push(("Allow".into(), "GET, PUT".into()));
            a
        }
        _ => Answer::text(501, "Unsupported HTTP method."),
    }
}

fn first_header<'a>(req: &'a Request, names: &[&'static str]) -> Option<(&'static str, &'a str)> {
    names.iter().find_map(|n| req.header(n).map(|v| (*n, v)))
}

fn get(mmds: &Mmds, req: &Request) -> Answer {
    if mmds.settings().version == MmdsVersion::V2 {
        match first_header(req, &TOKEN_HEADERS) {
            None => {
                return Answer::text(
                    401,
                    "No MMDS token provided. Use `X-metadata-token` or \
                     `X-aws-ec2-metadata-token` header to specify the session token.",
                )
            }
            Some((_, t)) if !mmds.tokens().valid(t) => {
                return Answer::text(401, "MMDS token not valid.")
            }
            Some(_) => {}
        }
    }
    let json = !mmds.settings().imds_compat
        && req
            .header("Accept")
            .is_some_and(|a| a.trim() == "application/json");
    let store = mmds.store();
    let Some(v) = store.lookup(&req.path) else {
        return Answer::text(404, format!("Resource not found: {}.", req.path));
    };
    if json {
        return Answer {
            status: 200,
            content_type: "application/json",
            headers: Vec::new(),
            body: serde_json::to_vec(v).unwrap_or_default(),
        };
    }
    match imds_text(v) {
        Some(t) => Answer::text(200, t),
        None => Answer::text(
            501,
            "Cannot retrieve value. The value has an unsupported type.",
        ),
    }
}

fn put_token(mmds: &Mmds, req: &Request) -> Answer {
    if let Some((name, _)) = req
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("X-Forwarded-For"))
    {
        return Answer::text(
            400,
            format!("Invalid header. Reason: Unsupported header name. Key: {name}"),
        );
    }
    if normalize(&req.path) != "/latest/api/token" {
        return Answer::text(404, format!("Resource not found: {}.", req.path));
    }
    let Some((header, value)) = first_header(req, &TTL_HEADERS) else {
        return Answer::text(
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
             `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Answer::text(
            400,
            format!("Invalid header. Reason: Invalid value. Key:{header}; Value:{value}"),
        );
    };
    if !(1..=MAX_TTL).contains(&ttl) {
        return Answer::text(
            400,
            format!(
                "Invalid time to live value provided for token: {ttl}. Please provide a value \
                 between 1 and {MAX_TTL}."
            ),
        );
    }
    match mmds.tokens().issue(Duration::from_secs(ttl.into())) {
        Ok(token) => {
            let mut a = Answer::text(200, token);
            a.headers.push((header.to_string(), ttl.to_string()));
            a
        }
        Err(e) => Answer::text(500, format!("Cannot make a token: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::http::{Event, RequestParser};
    use kiln_api::models::MmdsConfig;
    use serde_json::json;

    fn req(text: &str) -> Request {
        let mut p = RequestParser::new(4096);
        p.feed(text.as_bytes());
        match p.next_event() {
            Some(Event::Request(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    fn mmds(version: MmdsVersion, imds_compat: bool) -> Mmds {
        let m = Mmds::new(crate::store::DEFAULT_SIZE_LIMIT);
        m.configure(MmdsConfig {
            version,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: None,
            imds_compat,
        });
        m.store()
            .put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 7}}, "s": ""}))
            .unwrap();
        m
    }

    fn body(a: &Answer) -> &str {
        std::str::from_utf8(&a.body).unwrap()
    }

    #[test]
    fn v1_get_in_imds_and_json_form() {
        let m = mmds(MmdsVersion::V1, false);
        let a = answer(&m, &req("GET /latest/meta-data/ HTTP/1.1\r\n\r\n"));
        assert_eq!((a.status, body(&a)), (200, "ami-id\nn"));
        let a = answer(&m, &req("GET / HTTP/1.1\r\n\r\n"));
        assert_eq!(body(&a), "latest/\ns");
        let a = answer(
            &m,
            &req("GET /latest/meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n"),
        );
        assert_eq!(
            (a.status, a.content_type, body(&a)),
            (200, "application/json", "\"ami-1\"")
        );
        let a = answer(&m, &req("GET /latest/meta-data/n HTTP/1.1\r\n\r\n"));
        assert_eq!(a.status, 501);
        let a = answer(&m, &req("GET /nothing HTTP/1.1\r\n\r\n"));
        assert_eq!((a.status, body(&a)), (404, "Resource not found: /nothing."));
        let a = answer(&m, &req("DELETE / HTTP/1.1\r\n\r\n"));
        assert_eq!(a.status, 405);
        assert!(String::from_utf8(a.to_bytes(false))
            .unwrap()
            .contains("\r\nAllow: GET, PUT\r\n"));
        let a = answer(&m, &req("POST / HTTP/1.1\r\n\r\n"));
        assert_eq!(a.status, 501);
        // imds_compat ignores Accept.
        let m = mmds(MmdsVersion::V1, true);
        let a = answer(
            &m,
            &req("GET /latest HTTP/1.1\r\nAccept: application/json\r\n\r\n"),
        );
        assert_eq!(body(&a), "meta-data/");
    }

    #[test]
    fn v2_needs_a_token_that_works_until_it_expires() {
        let m = mmds(MmdsVersion::V2, false);
        let get = |t: &str| answer(&m, &req(&format!("GET /s HTTP/1.1\r\n{t}\r\n")));
        assert_eq!(get("").status, 401);
        assert_eq!(get("X-metadata-token: nope\r\n").status, 401);
        let put = |h: &str| {
            answer(
                &m,
                &req(&format!("PUT /latest/api/token HTTP/1.1\r\n{h}\r\n")),
            )
        };
        assert_eq!(put("").status, 400);
        assert_eq!(put("X-metadata-token-ttl-seconds: 0\r\n").status, 400);
        assert_eq!(put("X-metadata-token-ttl-seconds: 21601\r\n").status, 400);
        assert_eq!(put("X-metadata-token-ttl-seconds: x\r\n").status, 400);
        let fwd = put("X-metadata-token-ttl-seconds: 5\r\nX-Forwarded-For: 1.2.3.4\r\n");
        assert_eq!(fwd.status, 400);
        let ok = put("x-aws-ec2-metadata-token-ttl-seconds: 1\r\n");
        assert_eq!(ok.status, 200);
        let token = body(&ok).to_string();
        assert_eq!(token.len(), TOKEN_LEN);
        // A token with one digit changed, or from another key, is refused.
        let mut forged = token.clone().into_bytes();
        forged[20] = if forged[20] == b'0' { b'1' } else { b'0' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(get(&format!("X-metadata-token: {forged}\r\n")).status, 401);
        let other = Tokens::default().issue(Duration::from_secs(60)).unwrap();
        assert_eq!(get(&format!("X-metadata-token: {other}\r\n")).status, 401);
        assert_eq!(
            ok.headers,
            vec![("X-aws-ec2-metadata-token-ttl-seconds".into(), "1".into())]
        );
        let a = get(&format!("X-metadata-token: {token}\r\n"));
        assert_eq!((a.status, body(&a)), (200, ""));
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(get(&format!("X-metadata-token: {token}\r\n")).status, 401);
        let a = answer(
            &m,
            &req("PUT /latest/api/other HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n"),
        );
        assert_eq!(a.status, 404);
    }
}
