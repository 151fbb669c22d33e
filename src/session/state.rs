//! What a session is, as types (`docs/protocol.md`, "Session lifecycle"):
//! its phase, checked on every transition, and its authentication. Whether it
//! has joined its document is its subscription (see [`super::Subscription`]):
//! there is no separate flag that could disagree with it.

use std::cell::Cell;
use std::time::Instant;

/// Who started a close handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// The relay sent Close first (shutdown, idle, a protocol error, ...).
    Relay,
    /// The client sent Close first; the relay echoed it.
    Peer,
    /// No one: the client's stream ended or failed without a Close frame.
    Transport,
}

/// Where a connection is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Upgrading,
    Validating,
    Connected,
    /// A Close frame is queued; nothing else is sent. The relay fails the
    /// connection if the close handshake is not complete within
    /// `limits.close_timeout_ms` of `since`.
    Closing {
        since: Instant,
        by: Initiator,
    },
    Disconnected,
}

impl Phase {
    /// The allowed transitions, and only those.
    pub fn can_become(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Upgrading, Validating)
                | (Upgrading, Disconnected)
                | (Validating, Connected)
                | (Validating, Disconnected)
                | (Connected, Closing { .. })
                | (Connected, Disconnected)
                | (Closing { .. }, Disconnected)
        )
    }
}

/// An attempted transition the state machine does not allow (a relay bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid session transition {from:?} -> {to:?}")]
pub struct InvalidTransition {
    pub from: Phase,
    pub to: Phase,
}

/// A phase whose transitions are checked, in every build.
#[derive(Debug)]
pub struct Lifecycle(Cell<Phase>);

impl Lifecycle {
    pub fn new(phase: Phase) -> Lifecycle {
        Lifecycle(Cell::new(phase))
    }

    pub fn get(&self) -> Phase {
        self.0.get()
    }

    /// Moves to `to` if the state machine allows it; otherwise nothing changes.
    pub fn advance(&self, to: Phase) -> Result<(), InvalidTransition> {
        let from = self.0.get();
        if !from.can_become(to) {
            return Err(InvalidTransition { from, to });
        }
        self.0.set(to);
        Ok(())
    }
}

/// The user a session authenticated as, with what every reply and broadcast
/// of the session needs, computed once at `authenticate`.
#[derive(Debug)]
pub struct User {
    pub user_id: String,
    pub user_name: String,
    pub session_id: String,
    pub color: String,
    /// `user_id` as a JSON string, escaped once for every broadcast.
    pub user_id_json: String,
    /// When the token's `exp` (plus `auth.jwt_leeway_secs`) passes: the
    /// ticker then closes the session with 4001. `None`: never (`dev` mode).
    pub expires_at: Option<Instant>,
}

/// Whether a session has authenticated, and as whom.
#[derive(Debug, Default)]
pub enum Auth {
    #[default]
    Pending,
    Authenticated(User),
}

impl Auth {
    pub fn user(&self) -> Option<&User> {
        match self {
            Auth::Pending => None,
            Auth::Authenticated(u) => Some(u),
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.user().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_transitions() {
        use Phase::*;
        let closing = Closing { since: Instant::now(), by: Initiator::Relay };
        let all = [Upgrading, Validating, Connected, closing, Disconnected];
        let allowed: Vec<(Phase, Phase)> =
            all.iter().flat_map(|&a| all.iter().map(move |&b| (a, b))).filter(|(a, b)| a.can_become(*b)).collect();
        assert_eq!(
            allowed,
            vec![
                (Upgrading, Validating),
                (Upgrading, Disconnected),
                (Validating, Connected),
                (Validating, Disconnected),
                (Connected, closing),
                (Connected, Disconnected),
                (closing, Disconnected)
            ]
        );
    }

    #[test]
    fn an_invalid_transition_is_refused_and_changes_nothing() {
        let l = Lifecycle::new(Phase::Connected);
        let err = l.advance(Phase::Validating).unwrap_err();
        assert_eq!(err, InvalidTransition { from: Phase::Connected, to: Phase::Validating });
        assert_eq!(l.get(), Phase::Connected);
        l.advance(Phase::Disconnected).unwrap();
        assert!(l.advance(Phase::Connected).is_err());
    }
}
