//! `/metrics` in the Prometheus/OpenMetrics text format (prometheus-client): TFTP and
//! HTTP requests and bytes by file class, errors by kind, tsize probes, in-flight
//! transfers, HTTP connections, ProxyDHCP requests/replies/drops by reason, boot log
//! machines by last step and events by kind, sync runs/failures/duration/bytes,
//! snapshot generation and age. Values are read from the servers' atomic counters
//! (and the boot log) at scrape time.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use hyper::{Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::file_class::{ClassCounters, FileClass};
use crate::http::{full, Body, HttpErrorKind};
use crate::serve::Daemon;

struct DaemonCollector(Arc<Daemon>);

impl std::fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DaemonCollector")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn labelled_counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> std::fmt::Result {
    let mut fam = e.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (l, v) in values {
        let labels = [(label.to_string(), l.to_string())];
        ConstCounter::new(*v).encode(fam.encode_family(&labels)?)?;
    }
    Ok(())
}

fn by_class(counters: &ClassCounters) -> Vec<(&'static str, u64)> {
    FileClass::ALL
        .iter()
        .map(|c| (c.label(), counters[*c].load(Relaxed)))
        .collect()
}

impl Collector for DaemonCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let d = &self.0;
        encode_store(&mut e)?;
        encode_tftp(&mut e, &d.tftp_metrics)?;
        encode_http(&mut e, &d.http_metrics)?;
        encode_boots(&mut e, &d.boots)?;
        encode_dhcp(&mut e, &d.dhcp_metrics)?;
        encode_sync(&mut e, d)
    }
}

/// The scheduled store check's results.
fn encode_store(e: &mut DescriptorEncoder) -> std::fmt::Result {
    let v = &crate::fsck::VERIFY;
    let problems = v.problems.load(Relaxed);
    if problems >= 0 {
        gauge(
            e,
            "rackboot_store_problems",
            "Problems the last store check (fsck) found",
            problems,
        )?;
    }
    gauge(
        e,
        "rackboot_store_verified_timestamp_seconds",
        "When the last store check finished (Unix seconds; 0: never)",
        v.finished.load(Relaxed) as i64,
    )?;
    Ok(())
}

/// TFTP counters and gauges.
fn encode_tftp(e: &mut DescriptorEncoder, t: &crate::tftp::TftpMetrics) -> std::fmt::Result {
    labelled_counter(
        e,
        "rackboot_tftp_requests",
        "TFTP transfers started, by file class",
        "class",
        &by_class(&t.class_requests),
    )?;
    labelled_counter(
        e,
        "rackboot_tftp_sent_bytes",
        "TFTP payload bytes sent, by file class",
        "class",
        &by_class(&t.class_bytes),
    )?;
    counter(
        e,
        "rackboot_tftp_received_requests",
        "TFTP request packets received",
        t.requests.load(Relaxed),
    )?;
    counter(
        e,
        "rackboot_tftp_transfers_ok",
        "TFTP transfers completed",
        t.transfers_ok.load(Relaxed),
    )?;
    counter(
        e,
        "rackboot_tftp_transfers_failed",
        "TFTP transfers that failed",
        t.transfers_failed.load(Relaxed),
    )?;
    counter(
        e,
        "rackboot_tftp_tsize_probes",
        "TFTP size probes (RRQ, OACK, client ERROR)",
        t.tsize_probes.load(Relaxed),
    )?;
    labelled_counter(
        e,
        "rackboot_tftp_errors",
        "TFTP errors by kind",
        "kind",
        &[
            ("not_found", t.not_found.load(Relaxed)),
            ("access_violation", t.access_violation.load(Relaxed)),
            ("illegal_operation", t.illegal_op.load(Relaxed)),
            ("timeout", t.timeouts.load(Relaxed)),
            ("unacknowledged", t.unacknowledged.load(Relaxed)),
            ("aborted", t.aborted.load(Relaxed)),
            ("busy", t.busy.load(Relaxed)),
        ],
    )?;
    gauge(
        e,
        "rackboot_tftp_transfers_in_flight",
        "TFTP transfers in progress",
        t.in_flight.load(Relaxed) as i64,
    )?;
    Ok(())
}

/// ProxyDHCP counters (zero while `dhcp.proxy` is off).
fn encode_dhcp(e: &mut DescriptorEncoder, m: &crate::dhcp::DhcpMetrics) -> std::fmt::Result {
    counter(
        e,
        "rackboot_dhcp_requests",
        "DHCP datagrams received on ports 67 and 4011",
        m.requests.load(Relaxed),
    )?;
    labelled_counter(
        e,
        "rackboot_dhcp_replies",
        "ProxyDHCP replies sent, by message type",
        "type",
        &[
            ("offer", m.offers.load(Relaxed)),
            ("ack", m.acks.load(Relaxed)),
        ],
    )?;
    let drops: Vec<(&str, u64)> = crate::dhcp::DropReason::ALL
        .iter()
        .map(|r| (r.label(), m.dropped(*r)))
        .collect();
    labelled_counter(
        e,
        "rackboot_dhcp_dropped",
        "DHCP requests not answered, by reason",
        "reason",
        &drops,
    )?;
    counter(
        e,
        "rackboot_dhcp_send_errors",
        "ProxyDHCP replies that could not be sent",
        m.send_errors.load(Relaxed),
    )
}

/// HTTP counters and gauges.
fn encode_http(e: &mut DescriptorEncoder, h: &crate::http::HttpMetrics) -> std::fmt::Result {
    counter(
        e,
        "rackboot_http_requests",
        "HTTP requests answered (every path)",
        h.requests.load(Relaxed),
    )?;
    labelled_counter(
        e,
        "rackboot_http_file_requests",
        "HTTP file responses, by file class",
        "class",
        &by_class(&h.class_requests),
    )?;
    labelled_counter(
        e,
        "rackboot_http_sent_bytes",
        "HTTP file body bytes sent, by file class",
        "class",
        &by_class(&h.class_bytes),
    )?;
    labelled_counter(
        e,
        "rackboot_http_responses",
        "HTTP responses by status class",
        "code",
        &[
            ("2xx", h.status_2xx.load(Relaxed)),
            ("3xx", h.status_3xx.load(Relaxed)),
            ("4xx", h.status_4xx.load(Relaxed)),
            ("5xx", h.status_5xx.load(Relaxed)),
        ],
    )?;
    let kinds: Vec<(&str, u64)> = HttpErrorKind::ALL
        .iter()
        .map(|k| (k.label(), h.error_count(*k)))
        .collect();
    labelled_counter(
        e,
        "rackboot_http_errors",
        "HTTP errors by kind: error responses, and connections hyper ended (header_too_large is a 431, header_timeout a slow or silent client)",
        "kind",
        &kinds,
    )?;
    gauge(
        e,
        "rackboot_http_transfers_in_flight",
        "HTTP file bodies being sent",
        h.transfers_in_flight.load(Relaxed) as i64,
    )?;
    gauge(
        e,
        "rackboot_http_connections_open",
        "HTTP connections open",
        h.connections_open.load(Relaxed) as i64,
    )?;
    counter(
        e,
        "rackboot_http_connections_rejected",
        "HTTP connections refused at the limit",
        h.connections_rejected.load(Relaxed),
    )?;
    Ok(())
}

/// The boot log: machines by the last step they reached, events by kind.
fn encode_boots(e: &mut DescriptorEncoder, b: &crate::serve::bootlog::BootLog) -> std::fmt::Result {
    let mut fam = e.encode_descriptor(
        "rackboot_boot_machines",
        "Machines in the boot log by the last step their boot reached (none: no file served yet)",
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (step, n) in b.by_last_step() {
        let labels = [(
            "step".to_string(),
            step.map_or("none", |s| s.label()).to_string(),
        )];
        ConstGauge::new(n as i64).encode(fam.encode_family(&labels)?)?;
    }
    let kinds: Vec<(&str, u64)> = crate::serve::bootlog::Kind::ALL
        .iter()
        .zip(&b.events_total)
        .map(|(k, n)| (k.label(), n.load(Relaxed)))
        .collect();
    labelled_counter(
        e,
        "rackboot_boot_events",
        "Boot log events recorded, by kind (dhcp_offer, tftp, http)",
        "kind",
        &kinds,
    )?;
    counter(
        e,
        "rackboot_boot_unestablished",
        "Machines the boot log did not protect from eviction because their client address had established its cap of machines already",
        b.unestablished(),
    )
}

/// Sync runs and the served snapshot.
fn encode_sync(e: &mut DescriptorEncoder, d: &Daemon) -> std::fmt::Result {
    let st = d.status();
    counter(e, "rackboot_sync_runs", "Sync runs finished", st.runs)?;
    counter(
        e,
        "rackboot_sync_failures",
        "Sync runs that failed",
        st.failures,
    )?;
    counter(
        e,
        "rackboot_sync_fetched_bytes",
        "Payload bytes fetched by syncs",
        st.bytes_fetched_total,
    )?;
    counter(
        e,
        "rackboot_sync_duration_milliseconds",
        "Time spent syncing",
        d.sync_duration_ms_total.load(Relaxed),
    )?;
    gauge(
        e,
        "rackboot_sync_in_progress",
        "1 while a sync runs",
        i64::from(st.running),
    )?;
    gauge(
        e,
        "rackboot_sync_last_success",
        "1 if the last sync succeeded",
        i64::from(st.last_result.as_deref().is_some_and(|r| r != "failed")),
    )?;
    let snap = d.shown();
    gauge(
        e,
        "rackboot_snapshot_generation",
        "Generation being served (0: none)",
        snap.as_ref().map(|s| s.generation as i64).unwrap_or(0),
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|x| x.as_secs())
        .unwrap_or(0);
    gauge(
        e,
        "rackboot_snapshot_age_seconds",
        "Age of the served snapshot (-1: none)",
        snap.as_ref()
            .map(|s| now.saturating_sub(s.created) as i64)
            .unwrap_or(-1),
    )?;
    Ok(())
}

/// The `/metrics` response.
pub fn response(d: &Arc<Daemon>) -> Response<Body> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector(d.clone())));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(full(format!("cannot encode metrics: {e}\n")))
            .expect("valid response");
    }
    Response::builder()
        .header(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .header("cache-control", "no-store")
        .body(full(Bytes::from(text)))
        .expect("valid response")
}
