//! Multi-peer tests of the data plane on 127.0.0.1, including adversarial peers
//! that need the private wire format.

mod adversarial;
mod client_delay;
mod matchmaking;
mod p2p;
mod rounds;
mod strangers;
mod support;
