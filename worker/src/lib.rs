//! The verimail worker: consumes verification requests, throttles, signs,
//! renders, sends, and publishes exactly one outcome per request.

pub mod mail;
