//! The API server.

pub mod auth;
pub mod cel;
pub mod discovery;
pub mod errors;
pub mod gc;
pub mod handlers;
pub mod patch;
pub mod rbac;
pub mod resources;
pub mod schema;
pub mod selectors;
pub mod store;
pub mod table;
pub mod tls;
