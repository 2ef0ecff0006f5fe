//! The command queue and the event queue.

pub mod index;
