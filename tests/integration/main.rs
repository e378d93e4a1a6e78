//! Integration tests: the real `rackboot` binary against fake upstreams and real
//! clients on 127.0.0.1 (and in network namespaces the tests create, for DHCP). All of them build into this one test binary. Shared helpers
//! live in `harness.rs`, the fake upstream in `upstream.rs`; every other file is one
//! subject.

mod api;
mod bootcfg;
mod coherence;
mod crash;
mod dhcp;
mod gc;
mod harness;
mod hostile_upstream;
mod http;
mod http_hostile;
mod import;
mod metrics;
mod mirror_cmd;
mod serve;
mod status;
mod sync;
mod systemd;
mod tftp;
mod tftp_hostile;
mod tls;
mod trust_config;
mod upstream;
mod web;
