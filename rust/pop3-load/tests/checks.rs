//! The load generator must pass a correct server and fail (exit 1) on every kind
//! of wrong reply. A tiny scripted POP3 server on 127.0.0.1 plays each fault.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    PassErr,
    RetrShort,
    Unterminated,
    BareLfStatus,
    ListSumWrong,
    NoCloseAfterQuit,
}

// Message 2 has a line starting with "." (stuffed on the wire) and a bare LF.
const MSGS: [&[u8]; 2] = [
    b"Subject: a\r\n\r\nhello\r\n",
    b"Subject: b\r\n\r\n.dot\r\nx\ny\r\n",
];

fn stuffed(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at_start = true;
    for (i, &b) in m.iter().enumerate() {
        if at_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_start = b == b'\n' && i > 0 && m[i - 1] == b'\r';
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn serve_one(s: TcpStream, fault: Fault) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let status = if fault == Fault::BareLfStatus {
        "+OK ready\n"
    } else {
        "+OK ready\r\n"
    };
    w.write_all(status.as_bytes()).unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let cmd: Vec<&str> = line.trim_end().split(' ').collect();
        let total: usize = MSGS.iter().map(|m| m.len()).sum();
        let reply: Vec<u8> = match cmd[0] {
            "USER" => b"+OK\r\n".to_vec(),
            "PASS" if fault == Fault::PassErr => b"-ERR [AUTH] no\r\n".to_vec(),
            "PASS" => b"+OK logged in\r\n".to_vec(),
            "STAT" => format!("+OK 2 {total}\r\n").into_bytes(),
            "NOOP" => b"+OK\r\n".to_vec(),
            "LIST" => {
                let extra = if fault == Fault::ListSumWrong { 1 } else { 0 };
                format!(
                    "+OK\r\n1 {}\r\n2 {}\r\n.\r\n",
                    MSGS[0].len() + extra,
                    MSGS[1].len()
                )
                .into_bytes()
            }
            "UIDL" => b"+OK\r\n1 aaa\r\n2 bbb\r\n.\r\n".to_vec(),
            "RETR" | "TOP" => {
                let k: usize = cmd[1].parse().unwrap();
                let mut m = MSGS[k - 1].to_vec();
                if cmd[0] == "TOP" {
                    let end = m.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    m.truncate(end);
                }
                if fault == Fault::RetrShort && k == 2 {
                    m.pop();
                    m.pop();
                    m.pop();
                    m.extend_from_slice(b"\r\n");
                }
                let mut out = b"+OK\r\n".to_vec();
                if fault == Fault::Unterminated && k == 2 {
                    out.extend_from_slice(&m);
                    w.write_all(&out).unwrap();
                    return; // close without the terminator
                }
                out.extend_from_slice(&stuffed(&m));
                out
            }
            "QUIT" => {
                w.write_all(b"+OK bye\r\n").unwrap();
                if fault == Fault::NoCloseAfterQuit {
                    thread::sleep(Duration::from_secs(3));
                }
                return;
            }
            _ => b"-ERR unknown\r\n".to_vec(),
        };
        w.write_all(&reply).unwrap();
    }
}

fn run(fault: Fault, scenario: &str) -> (i32, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in l.incoming().take(200).flatten() {
            thread::spawn(move || serve_one(s, fault));
        }
    });
    let out = Command::new(env!("CARGO_BIN_EXE_pop3-load"))
        .args([
            "--port",
            &port.to_string(),
            "--scenario",
            scenario,
            "--count",
            "3",
        ])
        .args(["--concurrency", "1", "--timeout", "2", "--user-count", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), stdout)
}

#[test]
fn a_correct_server_passes_every_scenario() {
    for sc in ["login", "retr-all", "top", "pipelined"] {
        let (code, out) = run(Fault::None, sc);
        assert_eq!(code, 0, "{sc}: {out}");
        assert!(out.contains("\"errors\":0"), "{sc}: {out}");
    }
}

#[test]
fn every_fault_is_an_error() {
    for (fault, sc, what) in [
        (Fault::PassErr, "login", "PASS"),
        (Fault::RetrShort, "retr-all", "LIST said"),
        (Fault::RetrShort, "pipelined", "LIST said"),
        (Fault::Unterminated, "retr-all", "unterminated"),
        (Fault::BareLfStatus, "login", "CRLF"),
        (Fault::ListSumWrong, "retr-all", "STAT said"),
        (Fault::NoCloseAfterQuit, "login", "close"),
    ] {
        let (code, out) = run(fault, sc);
        assert_eq!(code, 1, "{sc}/{what}: {out}");
        assert!(out.contains(what), "{sc}: expected {what:?} in {out}");
    }
}

#[test]
fn refuses_a_non_loopback_target() {
    let out = Command::new(env!("CARGO_BIN_EXE_pop3-load"))
        .args([
            "--host",
            "192.0.2.1",
            "--port",
            "110",
            "--scenario",
            "login",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
