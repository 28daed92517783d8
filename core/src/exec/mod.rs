//! Running a resolved graph: [`schedule`] orders the work, [`cache`] keeps results between runs, [`run`]
//! drives both and reports what ran.

pub mod cache;
pub mod run;
pub mod schedule;

pub use cache::{Cache, Key};
pub use run::{Executor, NodeReport, NodeStatus, RunOptions, RunReport};
