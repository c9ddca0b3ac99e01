//! pop3-load: a POP3 load generator that checks every reply.
//!
//! One thread, one tokio current-thread runtime: the harness pins it to one core
//! (`taskset -c 1`) while the server has the other, so a single event loop is the
//! natural shape (no work-stealing, no cross-thread wakeups), and per-connection
//! state is a task plus a read buffer, which lets the idle scenario hold 10,000
//! connections cheaply. Every reply is checked: each status line starts with `+OK`
//! and ends with CRLF, multi-line replies must be terminated by `.` CRLF (read with
//! `pop3_wire::Unstuffer`, strict about CRLF), LIST/UIDL must agree with STAT, and the
//! unstuffed RETR length must equal the LIST size, or be 2 octets more where the
//! server added a CRLF to a last line without one (docs/wire.md: that CRLF is not part
//! of the size; the added line end must end a non-empty line with no LF in it, and
//! `--exact-sizes` refuses the case for mail known to end with line ends). A run with
//! any error exits with status 1. Results are one JSON line on stdout.
//!
//! Only loopback addresses are accepted as targets.

mod body;
mod procfs;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use body::BodyReader;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const USAGE: &str = "\
usage: pop3-load --port PORT --scenario NAME [options]

scenarios: login | retr-all | top | pipelined | idle | tls-login | tls-retr-all

  --host HOST            loopback address to connect to (default 127.0.0.1)
  --port PORT            server port (for tls-*: the implicit-TLS port)
  --scenario NAME        what each session does (see above)
  --users FILE           one 'user<TAB or :>password' per line
  --user-pattern PAT     user name pattern, %d = index (default user%d)
  --pass-pattern PAT     password pattern, %d = index (default pass%d)
  --user-count N         number of pattern users (default 100)
  --user-first N         first pattern index (default 1)
  --concurrency N        parallel sessions (idle: parallel logins) (default 8)
  --duration SECS        run for this long (default 10; idle: hold time)
  --count N              stop after N sessions instead of a duration
  --timeout SECS         per-session / per-reply limit (default 30)
  --connections N        idle: connections to hold (default 1000)
  --noop-interval SECS   idle: NOOP period per connection (default 5)
  --server-pid PID       report the server's CPU time and memory (process tree)
  --server-core N        report how busy core N was with work other than the server
  --ca FILE              tls-*: PEM CA to trust
  --sni NAME             tls-*: server name to verify (default localhost)
  --tls-resumption       tls-*: allow TLS session resumption (default off)
  --exact-sizes          every message ends with a line end: the unstuffed RETR
                         length must equal the LIST size (by default it may be 2
                         more, for the CRLF a server adds to a last line without one)
  --label TEXT           copied into the JSON result
";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Login,
    RetrAll,
    Top,
    Pipelined,
    Idle,
    TlsLogin,
    /// retr-all over implicit TLS.
    TlsRetrAll,
}

impl Scenario {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "login" => Scenario::Login,
            "retr-all" => Scenario::RetrAll,
            "top" => Scenario::Top,
            "pipelined" => Scenario::Pipelined,
            "idle" => Scenario::Idle,
            "tls-login" => Scenario::TlsLogin,
            "tls-retr-all" => Scenario::TlsRetrAll,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Scenario::Login => "login",
            Scenario::RetrAll => "retr-all",
            Scenario::Top => "top",
            Scenario::Pipelined => "pipelined",
            Scenario::Idle => "idle",
            Scenario::TlsLogin => "tls-login",
            Scenario::TlsRetrAll => "tls-retr-all",
        }
    }
}

struct Config {
    addr: SocketAddr,
    scenario: Scenario,
    users: Vec<(String, String)>,
    concurrency: usize,
    duration: Duration,
    count: Option<u64>,
    timeout: Duration,
    connections: usize,
    noop_interval: Duration,
    server_pid: Option<u32>,
    server_core: Option<usize>,
    tls: Option<(TlsConnector, rustls_pki_types::ServerName<'static>)>,
    exact_sizes: bool,
    label: String,
}

fn die(msg: &str) -> ! {
    eprintln!("pop3-load: {msg}\n\n{USAGE}");
    std::process::exit(2);
}

fn parse_secs(v: &str, what: &str) -> Duration {
    match v.parse::<f64>() {
        Ok(s) if (0.0..1e6).contains(&s) => Duration::from_secs_f64(s),
        _ => die(&format!("bad {what}: {v}")),
    }
}

fn parse_num<T: std::str::FromStr>(v: &str, what: &str) -> T {
    v.parse()
        .unwrap_or_else(|_| die(&format!("bad {what}: {v}")))
}

fn tls_connector(ca: &str, resumption: bool) -> TlsConnector {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .unwrap_or_else(|e| die(&format!("cannot read CA {ca}: {e}")));
    for c in certs {
        let c = c.unwrap_or_else(|e| die(&format!("bad CA {ca}: {e}")));
        roots
            .add(c)
            .unwrap_or_else(|e| die(&format!("bad CA {ca}: {e}")));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| die(&format!("TLS setup: {e}")))
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resumption {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    TlsConnector::from(Arc::new(cfg))
}

fn load_users(path: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| die(&format!("cannot read users file {path}: {e}")));
    let mut v = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.splitn(2, ['\t', ':']);
        let (Some(u), Some(p)) = (it.next(), it.next()) else {
            die(&format!("bad line in {path}: {line}"))
        };
        v.push((u.to_string(), p.to_string()));
    }
    v
}

fn parse_args() -> Config {
    let mut host = "127.0.0.1".to_string();
    let mut port: Option<u16> = None;
    let mut scenario = None;
    let mut users_file = None;
    let mut upat = "user%d".to_string();
    let mut ppat = "pass%d".to_string();
    let mut ucount: usize = 100;
    let mut ufirst: usize = 1;
    let mut concurrency = 8usize;
    let mut duration = Duration::from_secs(10);
    let mut count = None;
    let mut timeout = Duration::from_secs(30);
    let mut connections = 1000usize;
    let mut noop_interval = Duration::from_secs(5);
    let mut server_pid = None;
    let mut server_core = None;
    let mut ca = None;
    let mut sni = "localhost".to_string();
    let mut resumption = false;
    let mut exact_sizes = false;
    let mut label = String::new();

    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "-h" || a == "--help" {
            print!("{USAGE}");
            std::process::exit(0);
        }
        if a == "--tls-resumption" || a == "--exact-sizes" {
            if a == "--tls-resumption" {
                resumption = true;
            } else {
                exact_sizes = true;
            }
            i += 1;
            continue;
        }
        let Some(v) = args.get(i + 1).cloned() else {
            die(&format!("{a} needs a value"))
        };
        match a {
            "--host" => host = v,
            "--port" => port = Some(parse_num(&v, "port")),
            "--scenario" => {
                scenario = Some(Scenario::parse(&v).unwrap_or_else(|| die("unknown scenario")))
            }
            "--users" => users_file = Some(v),
            "--user-pattern" => upat = v,
            "--pass-pattern" => ppat = v,
            "--user-count" => ucount = parse_num(&v, "user count"),
            "--user-first" => ufirst = parse_num(&v, "user first"),
            "--concurrency" => concurrency = parse_num(&v, "concurrency"),
            "--duration" => duration = parse_secs(&v, "duration"),
            "--count" => count = Some(parse_num(&v, "count")),
            "--timeout" => timeout = parse_secs(&v, "timeout"),
            "--connections" => connections = parse_num(&v, "connections"),
            "--noop-interval" => noop_interval = parse_secs(&v, "noop interval"),
            "--server-pid" => server_pid = Some(parse_num(&v, "server pid")),
            "--server-core" => server_core = Some(parse_num(&v, "server core")),
            "--ca" => ca = Some(v),
            "--sni" => sni = v,
            "--label" => label = v,
            _ => die(&format!("unknown option {a}")),
        }
        i += 2;
    }
    let port = port.unwrap_or_else(|| die("--port is required"));
    let scenario = scenario.unwrap_or_else(|| die("--scenario is required"));
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| die(&format!("cannot resolve {host}")));
    if !addr.ip().is_loopback() {
        die("refusing a non-loopback target: this tool only loads servers on this machine");
    }
    let users = match users_file {
        Some(f) => load_users(&f),
        None => (ufirst..ufirst + ucount)
            .map(|k| {
                (
                    upat.replace("%d", &k.to_string()),
                    ppat.replace("%d", &k.to_string()),
                )
            })
            .collect(),
    };
    if users.is_empty() {
        die("no users");
    }
    if concurrency == 0 || concurrency > 100_000 || connections > 1_000_000 {
        die("concurrency must be 1..100000, connections at most 1000000");
    }
    if timeout.is_zero() {
        die("timeout must be positive");
    }
    let tls = if matches!(scenario, Scenario::TlsLogin | Scenario::TlsRetrAll) {
        let ca = ca.unwrap_or_else(|| die("tls-* scenarios need --ca"));
        let name = match sni.parse::<IpAddr>() {
            Ok(ip) => rustls_pki_types::ServerName::IpAddress(ip.into()),
            Err(_) => rustls_pki_types::ServerName::try_from(sni.clone())
                .unwrap_or_else(|_| die("bad --sni")),
        };
        Some((tls_connector(&ca, resumption), name))
    } else {
        None
    };
    Config {
        addr,
        scenario,
        users,
        concurrency,
        duration,
        count,
        timeout,
        connections,
        noop_interval,
        server_pid,
        server_core,
        tls,
        exact_sizes,
        label,
    }
}

// ---------------------------------------------------------------- connection

type Res<T> = Result<T, String>;

struct Conn<S> {
    s: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    timeout: Duration,
    scratch: Vec<u8>,
    /// Payload octets that are counted, not kept (cleared after every chunk).
    discard: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(s: S, cap: usize, timeout: Duration) -> Self {
        Conn {
            s,
            buf: vec![0; cap],
            start: 0,
            end: 0,
            timeout,
            scratch: Vec::new(),
            discard: Vec::new(),
        }
    }

    /// Read more octets into the buffer; error on EOF.
    async fn fill(&mut self) -> Res<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        let fut = self.s.read(&mut self.buf[self.end..]);
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err("timeout waiting for the server".into()),
            Ok(Err(e)) => Err(format!("read: {e}")),
            Ok(Ok(0)) => Err("server closed the connection".into()),
            Ok(Ok(n)) => {
                self.end += n;
                Ok(())
            }
        }
    }

    async fn send(&mut self, data: &[u8]) -> Res<()> {
        let fut = async {
            self.s.write_all(data).await?;
            self.s.flush().await
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err("timeout writing to the server".into()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Read one status line; it must start with +OK and end with CRLF.
    /// Returns the text after "+OK" (without the line end).
    async fn ok(&mut self, what: &str) -> Res<String> {
        loop {
            let avail = &self.buf[self.start..self.end];
            if let Some(p) = memchr::memchr(b'\n', avail) {
                let line = &avail[..=p];
                self.start += p + 1;
                if line.len() < 2 || line[line.len() - 2] != b'\r' {
                    return Err(format!("{what}: status line not ended by CRLF"));
                }
                if line.len() > 512 {
                    return Err(format!("{what}: status line over 512 octets"));
                }
                let text = &line[..line.len() - 2];
                if !text.starts_with(b"+OK") {
                    let shown = String::from_utf8_lossy(&text[..text.len().min(80)]).into_owned();
                    return Err(format!("{what}: {shown}"));
                }
                return Ok(String::from_utf8_lossy(&text[3..]).trim().to_string());
            }
            if avail.len() > 512 {
                return Err(format!("{what}: status line over 512 octets"));
            }
            self.fill().await?;
        }
    }

    /// Read a multi-line body up to its terminator. With `collect`, the payload is
    /// left in `self.scratch`.
    async fn body(&mut self, what: &str, collect: bool) -> Res<BodyReader> {
        let mut r = BodyReader::new();
        self.scratch.clear();
        loop {
            let out = if collect {
                &mut self.scratch
            } else {
                self.discard.clear();
                &mut self.discard
            };
            let n = r.feed(&self.buf[self.start..self.end], out);
            self.start += n;
            if r.done() {
                return Ok(r);
            }
            self.fill()
                .await
                .map_err(|e| format!("{what}: unterminated body: {e}"))?;
        }
    }

    /// After QUIT's +OK, the server closes; wait for that so the server side
    /// holds the TIME_WAIT and no trailing octets arrive.
    async fn expect_close(&mut self) -> Res<()> {
        if self.start != self.end {
            return Err("octets after the QUIT reply".into());
        }
        let mut b = [0u8; 64];
        match tokio::time::timeout(self.timeout, self.s.read(&mut b)).await {
            Err(_) => Err("server did not close after QUIT".into()),
            Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
            Ok(Ok(_)) => Err("octets after the QUIT reply".into()),
        }
    }
}

fn parse_stat(t: &str) -> Res<(usize, u64)> {
    let mut it = t.split_ascii_whitespace();
    let n = it.next().and_then(|x| x.parse().ok());
    let sz = it.next().and_then(|x| x.parse().ok());
    match (n, sz) {
        (Some(n), Some(sz)) if n <= 1_000_000 => Ok((n, sz)),
        _ => Err(format!("STAT: bad reply {t:?}")),
    }
}

/// Parse a LIST or UIDL body: lines "<n> <value>" numbered 1..=count.
fn parse_listing(body: &[u8], count: usize, what: &str) -> Res<Vec<u64>> {
    let text = std::str::from_utf8(body).map_err(|_| format!("{what}: not UTF-8"))?;
    let mut sizes = Vec::with_capacity(count);
    for (k, line) in text.split_terminator("\r\n").enumerate() {
        let mut it = line.split(' ');
        let idx: Option<usize> = it.next().and_then(|x| x.parse().ok());
        let val = it.next();
        if idx != Some(k + 1) || val.is_none() || it.next().is_some() {
            return Err(format!("{what}: bad line {line:?}"));
        }
        if what == "LIST" {
            sizes.push(
                val.and_then(|v| v.parse().ok())
                    .ok_or(format!("LIST: bad size {line:?}"))?,
            );
        } else {
            let v = val.unwrap_or("");
            if v.is_empty() || v.len() > 70 || !v.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err(format!("UIDL: bad unique-id {line:?}"));
            }
            sizes.push(0);
        }
    }
    if sizes.len() != count {
        return Err(format!(
            "{what}: {} entries, STAT said {count}",
            sizes.len()
        ));
    }
    Ok(sizes)
}

#[derive(Default)]
struct Tally {
    sessions: u64,
    messages: u64,
    bytes: u64,
    /// RETRs that were LIST size + 2: a message without a final line end.
    closing_crlf: u64,
    errors: u64,
    error_samples: Vec<String>,
    lat_us: Vec<u32>,
}

impl Tally {
    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.error_samples.len() < 10 {
            self.error_samples.push(e);
        }
    }
    fn merge(&mut self, o: Tally) {
        self.sessions += o.sessions;
        self.messages += o.messages;
        self.bytes += o.bytes;
        self.closing_crlf += o.closing_crlf;
        self.errors += o.errors;
        for e in o.error_samples {
            if self.error_samples.len() < 10 {
                self.error_samples.push(e);
            }
        }
        self.lat_us.extend(o.lat_us);
    }
}

async fn login<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Conn<S>, u: &str, p: &str) -> Res<()> {
    c.ok("greeting").await?;
    c.send(format!("USER {u}\r\n").as_bytes()).await?;
    c.ok("USER").await?;
    c.send(format!("PASS {p}\r\n").as_bytes()).await?;
    c.ok("PASS").await.map(|_| ())
}

async fn stat<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Conn<S>) -> Res<(usize, u64)> {
    c.send(b"STAT\r\n").await?;
    parse_stat(&c.ok("STAT").await?)
}

async fn list<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Conn<S>,
    n: usize,
    total: u64,
) -> Res<Vec<u64>> {
    c.send(b"LIST\r\n").await?;
    c.ok("LIST").await?;
    c.body("LIST", true).await?;
    let sizes = parse_listing(&c.scratch, n, "LIST")?;
    let sum: u64 = sizes.iter().sum();
    if sum != total {
        return Err(format!("LIST sizes add up to {sum}, STAT said {total}"));
    }
    Ok(sizes)
}

async fn quit<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Conn<S>) -> Res<()> {
    c.send(b"QUIT\r\n").await?;
    c.ok("QUIT").await?;
    c.expect_close().await
}

/// Checks one RETR body against its LIST size. The size does not count the CRLF a
/// server adds to a last line without one (docs/wire.md), so the body may be 2 octets
/// longer, if that CRLF ends a line that can have lacked one. Returns whether it did.
fn check_retr(k: usize, body: &BodyReader, want: u64, exact: bool) -> Res<bool> {
    let got = body.payload_len();
    if got == want {
        return Ok(false);
    }
    if !exact && got == want + 2 && body.may_lack_final_line_end() {
        return Ok(true);
    }
    let why = if got == want + 2 && !exact {
        " (2 more is allowed only for a last line that lacked its line end)"
    } else {
        ""
    };
    Err(format!("RETR {k}: {got} octets, LIST said {want}{why}"))
}

/// What one session did.
#[derive(Default)]
struct Done {
    messages: u64,
    /// Unstuffed payload octets.
    bytes: u64,
    closing_crlf: u64,
}

impl Done {
    fn retr(&mut self, k: usize, body: &BodyReader, want: u64, exact: bool) -> Res<()> {
        self.closing_crlf += u64::from(check_retr(k, body, want, exact)?);
        self.messages += 1;
        self.bytes += body.payload_len();
        Ok(())
    }
}

/// One session.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Conn<S>,
    sc: Scenario,
    exact: bool,
    u: &str,
    p: &str,
) -> Res<Done> {
    login(c, u, p).await?;
    let (n, total) = stat(c).await?;
    let mut done = Done::default();
    match sc {
        Scenario::Login | Scenario::TlsLogin | Scenario::Idle => {}
        Scenario::RetrAll | Scenario::TlsRetrAll => {
            let sizes = list(c, n, total).await?;
            c.send(b"UIDL\r\n").await?;
            c.ok("UIDL").await?;
            c.body("UIDL", true).await?;
            parse_listing(&c.scratch, n, "UIDL")?;
            for (k, &want) in sizes.iter().enumerate() {
                c.send(format!("RETR {}\r\n", k + 1).as_bytes()).await?;
                c.ok("RETR").await?;
                let body = c.body("RETR", false).await?;
                done.retr(k + 1, &body, want, exact)?;
            }
        }
        Scenario::Pipelined => {
            let sizes = list(c, n, total).await?;
            let mut cmds = Vec::with_capacity(n * 12);
            for k in 1..=n {
                cmds.extend_from_slice(format!("RETR {k}\r\n").as_bytes());
            }
            c.send(&cmds).await?;
            for (k, &want) in sizes.iter().enumerate() {
                c.ok("RETR").await?;
                let body = c.body("RETR", false).await?;
                done.retr(k + 1, &body, want, exact)?;
            }
        }
        Scenario::Top => {
            for k in 1..=n {
                c.send(format!("TOP {k} 0\r\n").as_bytes()).await?;
                c.ok("TOP").await?;
                let body = c.body("TOP", true).await?;
                // Headers plus the empty line that ends them (fixtures have bodies).
                if !c.scratch.ends_with(b"\r\n\r\n") {
                    return Err(format!("TOP {k} 0: reply does not end with the empty line"));
                }
                done.messages += 1;
                done.bytes += body.payload_len();
            }
        }
    }
    quit(c).await?;
    Ok(done)
}

async fn connect(cfg: &Config) -> Res<TcpStream> {
    let s = match tokio::time::timeout(cfg.timeout, TcpStream::connect(cfg.addr)).await {
        Err(_) => return Err("connect timeout".into()),
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Ok(Ok(s)) => s,
    };
    s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    Ok(s)
}

async fn one_session(cfg: &Config, u: &str, p: &str) -> Res<Done> {
    let tcp = connect(cfg).await?;
    let cap = 64 * 1024;
    let (sc, exact) = (cfg.scenario, cfg.exact_sizes);
    match &cfg.tls {
        None => session(&mut Conn::new(tcp, cap, cfg.timeout), sc, exact, u, p).await,
        Some((conn, name)) => {
            let tls = match tokio::time::timeout(cfg.timeout, conn.connect(name.clone(), tcp)).await
            {
                Err(_) => return Err("TLS handshake timeout".into()),
                Ok(Err(e)) => return Err(format!("TLS handshake: {e}")),
                Ok(Ok(t)) => t,
            };
            session(&mut Conn::new(tls, cap, cfg.timeout), sc, exact, u, p).await
        }
    }
}

async fn worker(cfg: Arc<Config>, w: usize, budget: Arc<AtomicU64>, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    let nu = cfg.users.len();
    let c = cfg.concurrency;
    // Each worker owns the users w, w+c, w+2c, ... so that no two sessions
    // share a mailbox (POP3 servers may lock it); with fewer users than
    // workers they are shared.
    let mut k = w % nu;
    let step = if nu >= c { c } else { 1 };
    loop {
        if cfg.count.is_some() {
            let left =
                budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1));
            if left.is_err() {
                break;
            }
        } else if Instant::now() >= deadline {
            break;
        }
        let (u, p) = &cfg.users[k];
        // Wrap back to this worker's own first user: `(k + step) % nu` would walk
        // into another worker's users whenever nu is not a multiple of c.
        k += step;
        if k >= nu {
            k = w % nu;
        }
        let t0 = Instant::now();
        match one_session(&cfg, u, p).await {
            Ok(d) => {
                t.sessions += 1;
                t.messages += d.messages;
                t.bytes += d.bytes;
                t.closing_crlf += d.closing_crlf;
                t.lat_us
                    .push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Err(e) => t.error(e),
        }
        if t.errors > 1000 {
            break;
        }
    }
    t
}

// ---------------------------------------------------------------- idle

struct IdleShared {
    logged_in: AtomicU64,
    stop: AtomicBool,
    noops: AtomicU64,
}

async fn idle_conn(
    cfg: Arc<Config>,
    idx: usize,
    sh: Arc<IdleShared>,
    sem: Arc<tokio::sync::Semaphore>,
) -> Tally {
    let mut t = Tally::default();
    let (u, p) = &cfg.users[idx % cfg.users.len()];
    let res: Res<()> = async {
        let permit = sem
            .acquire()
            .await
            .map_err(|_| "semaphore closed".to_string())?;
        let tcp = connect(&cfg).await?;
        let mut c = Conn::new(tcp, 2048, cfg.timeout);
        login(&mut c, u, p).await?;
        stat(&mut c).await?;
        drop(permit);
        sh.logged_in.fetch_add(1, Ordering::Relaxed);
        // Spread the NOOPs over the interval.
        let iv = cfg.noop_interval.max(Duration::from_millis(10));
        let offset = iv.mul_f64(((idx as u64).wrapping_mul(2654435761) % 1000) as f64 / 1000.0);
        let mut next = tokio::time::Instant::now() + offset;
        loop {
            // Check the stop flag at least every 100 ms.
            let nap = tokio::time::Instant::now() + Duration::from_millis(100);
            tokio::time::sleep_until(next.min(nap)).await;
            if sh.stop.load(Ordering::Relaxed) {
                break;
            }
            if tokio::time::Instant::now() >= next {
                c.send(b"NOOP\r\n").await?;
                c.ok("NOOP").await?;
                sh.noops.fetch_add(1, Ordering::Relaxed);
                next += iv;
            }
        }
        quit(&mut c).await
    }
    .await;
    match res {
        Ok(()) => t.sessions += 1,
        Err(e) => t.error(e),
    }
    t
}

async fn run_idle(cfg: Arc<Config>) -> (Tally, serde_json::Value) {
    let n = cfg.connections;
    let sh = Arc::new(IdleShared {
        logged_in: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        noops: AtomicU64::new(0),
    });
    let before = cfg.server_pid.map(procfs::tree_mem);
    let sem = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| tokio::spawn(idle_conn(cfg.clone(), i, sh.clone(), sem.clone())))
        .collect();
    // Wait until every connection is logged in (or has failed), bounded in time.
    let ramp_limit = cfg.timeout * 4 + Duration::from_secs(n as u64 / 100);
    let mut ramp_ok = false;
    while t0.elapsed() < ramp_limit {
        let done = handles.iter().filter(|h| h.is_finished()).count() as u64;
        if sh.logged_in.load(Ordering::Relaxed) + done >= n as u64 {
            ramp_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp_s = t0.elapsed().as_secs_f64();
    let logged_in = sh.logged_in.load(Ordering::Relaxed);
    let noops0 = sh.noops.load(Ordering::Relaxed);
    let h0 = Instant::now();
    tokio::time::sleep(cfg.duration).await;
    let held_s = h0.elapsed().as_secs_f64();
    let noops = sh.noops.load(Ordering::Relaxed) - noops0;
    let during = cfg.server_pid.map(procfs::tree_mem);
    sh.stop.store(true, Ordering::Relaxed);
    let mut t = Tally::default();
    for h in handles {
        match h.await {
            Ok(x) => t.merge(x),
            Err(e) => t.error(format!("task: {e}")),
        }
    }
    if !ramp_ok {
        t.error(format!(
            "only {logged_in} of {n} connections logged in within {ramp_limit:?}"
        ));
    }
    let mut extra = json!({
        "connections": n,
        "logged_in": logged_in,
        "ramp_s": ramp_s,
        "held_s": held_s,
        "noops": noops,
        "noops_per_s": noops as f64 / held_s.max(1e-9),
    });
    if let (Some(b), Some(d)) = (before, during) {
        let per = |x: u64, y: u64| (y as f64 - x as f64) / (logged_in.max(1) as f64);
        extra["server_mem"] = json!({
            "processes_before": b.processes,
            "processes_during": d.processes,
            "rss_before_kib": b.rss_kib,
            "rss_during_kib": d.rss_kib,
            "pss_before_kib": b.pss_kib,
            "pss_during_kib": d.pss_kib,
            "rss_per_conn_kib": per(b.rss_kib, d.rss_kib),
            "pss_per_conn_kib": per(b.pss_kib, d.pss_kib),
        });
    }
    t.sessions = noops; // ops for idle = NOOPs answered while holding
    (t, extra)
}

// ---------------------------------------------------------------- main

fn pct(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let cfg = Arc::new(parse_args());
    let nofile = procfs::raise_nofile();
    if cfg.scenario == Scenario::Idle && (cfg.connections as u64 + 64) > nofile {
        die(&format!(
            "open-files limit {nofile} is too low for {} connections",
            cfg.connections
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(&format!("runtime: {e}")));
    let cpu0 = procfs::self_cpu();
    let scpu0 = cfg.server_pid.map(procfs::tree_cpu_seconds);
    let core0 = cfg.server_core.and_then(procfs::core_busy_seconds);
    let t0 = Instant::now();
    let (mut tally, extra) = rt.block_on(async {
        if cfg.scenario == Scenario::Idle {
            return run_idle(cfg.clone()).await;
        }
        let deadline = Instant::now() + cfg.duration;
        let budget = Arc::new(AtomicU64::new(cfg.count.unwrap_or(0)));
        let hs: Vec<_> = (0..cfg.concurrency)
            .map(|w| tokio::spawn(worker(cfg.clone(), w, budget.clone(), deadline)))
            .collect();
        let mut t = Tally::default();
        for h in hs {
            match h.await {
                Ok(x) => t.merge(x),
                Err(e) => t.error(format!("task: {e}")),
            }
        }
        (t, json!({}))
    });
    let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
    let cpu1 = procfs::self_cpu();
    let client_cpu = (cpu1.0 - cpu0.0) + (cpu1.1 - cpu0.1);
    tally.lat_us.sort_unstable();
    let rate_base = if cfg.scenario == Scenario::Idle {
        extra["held_s"].as_f64().unwrap_or(elapsed).max(1e-9)
    } else {
        elapsed
    };
    let mut out = json!({
        "tool": "pop3-load",
        "label": cfg.label,
        "scenario": cfg.scenario.name(),
        "concurrency": cfg.concurrency,
        "elapsed_s": elapsed,
        "sessions": tally.sessions,
        "ops_per_s": tally.sessions as f64 / rate_base,
        "messages": tally.messages,
        "messages_per_s": tally.messages as f64 / elapsed,
        "bytes": tally.bytes,
        "retr_without_final_line_end": tally.closing_crlf,
        "mb_per_s": tally.bytes as f64 / 1e6 / elapsed,
        "errors": tally.errors,
        "error_samples": tally.error_samples,
        "client_cpu_s": client_cpu,
        "client_user_s": cpu1.0 - cpu0.0,
        "client_sys_s": cpu1.1 - cpu0.1,
        "latency_ms": {
            "p50": pct(&tally.lat_us, 0.5),
            "p90": pct(&tally.lat_us, 0.9),
            "p99": pct(&tally.lat_us, 0.99),
            "max": pct(&tally.lat_us, 1.0),
        },
    });
    if let (Some(pid), Some(s0)) = (cfg.server_pid, scpu0) {
        let server_cpu = procfs::tree_cpu_seconds(pid) - s0;
        out["server_cpu_s"] = json!(server_cpu);
        out["server_cpu_util"] = json!(server_cpu / elapsed);
        out["client_server_cpu_ratio"] = json!(if server_cpu > 0.0 {
            client_cpu / server_cpu
        } else {
            0.0
        });
        // Work on the server's core that was not the server: other processes on a
        // shared machine (or the kernel's softirq work for the loopback traffic).
        if let (Some(core), Some(b0)) = (cfg.server_core, core0) {
            if let Some(b1) = procfs::core_busy_seconds(core) {
                out["server_core_busy_util"] = json!((b1 - b0) / elapsed);
                out["server_core_other_util"] = json!(((b1 - b0) - server_cpu).max(0.0) / elapsed);
            }
        }
    }
    if let serde_json::Value::Object(m) = extra {
        for (k, v) in m {
            out[k] = v;
        }
    }
    println!("{out}");
    if tally.errors > 0 {
        for e in out["error_samples"].as_array().into_iter().flatten() {
            eprintln!("pop3-load: error: {}", e.as_str().unwrap_or(""));
        }
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing() {
        assert_eq!(
            parse_listing(b"1 10\r\n2 20\r\n", 2, "LIST").unwrap(),
            vec![10, 20]
        );
        assert!(parse_listing(b"1 10\r\n", 2, "LIST").is_err());
        assert!(parse_listing(b"2 10\r\n", 1, "LIST").is_err());
        assert!(parse_listing(b"1 abc\r\n", 1, "UIDL").is_ok());
        assert!(parse_listing(b"1 a b\r\n", 1, "UIDL").is_err());
        assert_eq!(parse_stat("2 30").unwrap(), (2, 30));
        assert!(parse_stat("x").is_err());
    }
}
