//! Traffic redirection for enrolled pods (tc programs in C, loaded with aya).
//!
//! Not built yet: this crate is the home of the eBPF redirection work (its own issue). It holds
//! no code so that nothing pretends to redirect traffic before that lands.
