//! A tiny loopback HTTP server speaking the part of the Hugging Face hub protocol that
//! hf-hub 0.5's sync API uses: `GET {endpoint}/{repo}/resolve/{rev}/{file}` with a
//! `Range: bytes=0-0` probe (needs `etag`, `x-repo-commit`, `content-range`) and then
//! `Range: bytes=N-` for the body.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub struct Server {
    pub endpoint: String,
    count: Arc<AtomicUsize>,
}

impl Server {
    /// Requests received so far (counted before the answer is written).
    pub fn requests(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// Serve `body` as `/{repo}/resolve/{rev}/{file}` (404 for anything else). The thread is
/// bounded: it stops after 16 connections or 30 s.
pub fn serve(repo: &str, rev: &str, file: &str, body: Vec<u8>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let served = count.clone();
    let path = format!("/{repo}/resolve/{rev}/{file}");
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conns = 0;
        while conns < 16 && Instant::now() < deadline {
            let (stream, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(_) => break,
            };
            conns += 1;
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range_start = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("range:") {
                    let v = v.trim().trim_start_matches("bytes=");
                    let (a, b) = v.split_once('-').unwrap_or((v, ""));
                    let a: usize = a.parse().unwrap_or(0);
                    let b: Option<usize> = b.trim().parse().ok();
                    range_start = Some((a, b));
                }
            }
            // Count before answering: the client may return (and the test read the count)
            // as soon as the last byte is written, before this thread runs on.
            served.fetch_add(1, Ordering::SeqCst);
            let mut out = stream;
            if target != path {
                let _ = out.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                continue;
            }
            let len = body.len();
            let (a, b) = range_start.unwrap_or((0, None));
            let b = b.unwrap_or(len - 1).min(len - 1);
            let chunk = &body[a.min(len)..=b];
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\netag: \"etag-{len}\"\r\nx-repo-commit: {COMMIT}\r\ncontent-range: bytes {a}-{b}/{len}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                chunk.len()
            );
            let _ = out.write_all(head.as_bytes());
            let _ = out.write_all(chunk);
            let _ = out.flush();
        }
    });
    Server { endpoint, count }
}
