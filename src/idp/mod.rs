//! The identity provider behind Validate: one small trait, so that the flow in `validate.rs` does not depend on which provider answers.
use std::{future::Future, pin::Pin};

use crate::entry::Session;

pub trait Provider: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn validate<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, IdpError>> + Send + 'a>>;
}

pub enum Answer {
    Valid(Session),
    Invalid,
}

#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    #[error("unreachable")]
    Unreachable,
}

impl IdpError {
    pub fn result_label(&self) -> &'static str {
        "unreachable"
    }
}
