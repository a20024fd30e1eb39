//! The sandbox lifecycle as a pure transition function.
//!
//! ```text
//!            boot            agent_up
//!   (new) ─────────► creating ───────► running
//!                      │  ▲              │ stop / exited
//!           boot_failed│  │ boot          ▼
//!                      ▼  └────────── stopped ◄─┐
//!                    failed ──────────────┘     │ stop (idempotent)
//!   any live state ── delete ──► deleted
//! ```
//!
//! A sandbox whose process dies on its own goes to `failed` with a reason;
//! `stop` of a stopped or failed sandbox is allowed and changes nothing
//! (stop is idempotent), so is `delete` of a deleted one.

use flotilla_api::SandboxState;

/// What happened to a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A boot starts (create, start, restart).
    Boot,
    /// The agent said it is ready.
    AgentUp,
    /// The boot failed.
    BootFailed,
    /// A user asked for a stop and the process is gone.
    Stopped,
    /// The process died without being asked to.
    Died,
    /// The sandbox is deleted.
    Delete,
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} sandbox cannot take {event:?}")]
pub struct InvalidTransition {
    pub from: SandboxState,
    pub event: Event,
}

/// The next state, or why there is none.
pub fn transition(from: SandboxState, event: Event) -> Result<SandboxState, InvalidTransition> {
    use Event as E;
    use SandboxState as S;
    let to = match (from, event) {
        (S::Stopped | S::Failed, E::Boot) => S::Creating,
        (S::Creating, E::AgentUp) => S::Running,
        (S::Creating, E::BootFailed) => S::Failed,
        (S::Creating | S::Running | S::Stopped | S::Failed, E::Stopped) => S::Stopped,
        (S::Running | S::Creating, E::Died) => S::Failed,
        (S::Creating | S::Running | S::Stopped | S::Failed | S::Deleted, E::Delete) => S::Deleted,
        (S::Creating | S::Running | S::Deleted, E::Boot)
        | (S::Running | S::Stopped | S::Failed | S::Deleted, E::AgentUp)
        | (S::Running | S::Stopped | S::Failed | S::Deleted, E::BootFailed)
        | (S::Deleted, E::Stopped)
        | (S::Stopped | S::Failed | S::Deleted, E::Died) => return Err(InvalidTransition { from, event }),
    };
    Ok(to)
}

/// Whether exec, put, get and sessions may be tried.
pub fn accepts_work(s: SandboxState) -> bool {
    match s {
        SandboxState::Running => true,
        SandboxState::Creating | SandboxState::Stopped | SandboxState::Failed | SandboxState::Deleted => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SandboxState as S;

    const ALL_STATES: [S; 5] = [S::Creating, S::Running, S::Stopped, S::Failed, S::Deleted];
    const ALL_EVENTS: [Event; 6] =
        [Event::Boot, Event::AgentUp, Event::BootFailed, Event::Stopped, Event::Died, Event::Delete];

    #[test]
    fn happy_path() {
        let s = transition(S::Stopped, Event::Boot).unwrap();
        let s = transition(s, Event::AgentUp).unwrap();
        assert_eq!(s, S::Running);
        let s = transition(s, Event::Stopped).unwrap();
        assert_eq!(transition(s, Event::Boot).unwrap(), S::Creating);
    }

    #[test]
    fn stop_and_delete_are_idempotent() {
        for s in [S::Running, S::Stopped, S::Failed, S::Creating] {
            assert_eq!(transition(s, Event::Stopped).unwrap(), S::Stopped, "{s}");
        }
        for s in ALL_STATES {
            assert_eq!(transition(s, Event::Delete).unwrap(), S::Deleted, "{s}");
        }
    }

    #[test]
    fn deleted_is_final() {
        for e in ALL_EVENTS {
            let r = transition(S::Deleted, e);
            assert!(r.is_err() || r == Ok(S::Deleted), "{e:?}");
        }
    }

    #[test]
    fn no_double_boot() {
        assert!(transition(S::Running, Event::Boot).is_err());
        assert!(transition(S::Creating, Event::Boot).is_err());
    }

    #[test]
    fn only_running_accepts_work() {
        for s in ALL_STATES {
            assert_eq!(accepts_work(s), s == S::Running);
        }
    }
}
