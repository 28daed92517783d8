//! Running a resolved graph: [`schedule`] orders the work, [`key`] says what determines each result,
//! [`cache`] keeps results between runs ([`disk`] between processes), [`args`] binds a node's inputs, [`lists`] runs a node over
//! list values, and [`run`] drives them and fills a [`report`]; [`options`] are the settings every run shares.

pub mod args;
pub mod cache;
pub mod disk;
pub mod key;
pub mod lists;
pub mod notes;
pub mod observer;
pub mod options;
pub mod report;
pub mod run;
pub mod schedule;

pub use cache::Cache;
pub use disk::DiskCache;
pub use key::Key;
pub use observer::Observer;
pub use options::RunOptions;
pub use report::{NodeReport, NodeStatus, RunReport};
pub use run::Executor;
