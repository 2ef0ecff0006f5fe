//! The command queue and the event queue.

pub mod cmdq;
pub mod evtq;
pub mod index;
