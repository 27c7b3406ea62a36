#![allow(dead_code)]

pub mod app;
pub mod process;
pub mod redis_server;
pub mod store;
pub mod tokens;
