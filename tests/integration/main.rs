//! Integration tests: the real `rackboot` binary against fake upstreams and real
//! clients on 127.0.0.1. All of them build into this one test binary.

mod bootcfg;
mod coherence;
mod crash;
mod harness;
mod hostile_upstream;
mod http;
mod http_hostile;
mod import;
mod mirror;
mod mirror_cmd;
mod serve;
mod sync;
mod tftp;
mod trust_config;
mod web;
