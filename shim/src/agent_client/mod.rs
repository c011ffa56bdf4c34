//! Host-side client of the in-guest agent, behind a transport trait.
