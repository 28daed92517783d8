//! Lines for the run report from code that has no [`Ctx`] at hand: a lazily loaded checkpoint part
//! (see [`Handle::lazy`]) says when it was loaded and how long it took, and the line lands under the
//! node that first used it.
//!
//! [`Ctx`]: crate::node::Ctx
//! [`Handle::lazy`]: crate::value::Handle::lazy

use std::cell::RefCell;

thread_local! {
    static NOTES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Adds a line to the report of the node running now.
pub fn note(line: String) {
    NOTES.with(|n| n.borrow_mut().push(line));
}

/// The lines noted since the last call.
pub(crate) fn take() -> Vec<String> {
    NOTES.with(|n| std::mem::take(&mut *n.borrow_mut()))
}
