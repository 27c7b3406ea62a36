#![allow(dead_code)]

pub mod redis_server;
pub mod app;
