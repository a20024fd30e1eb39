//! The project's repository, through the `git` CLI.
