//! Users, whom they follow, and the handles they are known by.

use std::collections::BTreeSet;

use diptych::Aggregate;
use serde::{Deserialize, Serialize};

use crate::Rejection;

/// `RegisterUser`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterUser {
    /// The new user's id.
    pub user_id: String,
    /// The handle others know them by, unique whatever its case.
    pub handle: String,
    /// The name shown.
    pub display_name: String,
    /// A few words about them.
    pub bio: String,
}

impl RegisterUser {
    /// Its fields' rules, checked before the handle is claimed, so a refused
    /// registration holds no handle.
    pub fn check(&self) -> Result<(), Rejection> {
        check_handle(&self.handle)?;
        check_text("display_name", &self.display_name, 1, 100)?;
        check_text("bio", &self.bio, 0, 500)
    }
}

/// `FollowUser`: `user_id` starts following `target_id`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FollowUser {
    /// The follower.
    pub user_id: String,
    /// Whom they follow.
    pub target_id: String,
}

/// `UnfollowUser`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnfollowUser {
    /// The follower.
    pub user_id: String,
    /// Whom they stop following.
    pub target_id: String,
}

/// What a user is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum UserCommand {
    /// See [`RegisterUser`].
    Register(RegisterUser),
    /// See [`FollowUser`].
    Follow(FollowUser),
    /// See [`UnfollowUser`].
    Unfollow(UnfollowUser),
}

// Following someone needs them to exist: the application's own handler.
diptych::command!(FollowUser, id = user_id);
// The handle is claimed first: the application's own handler.
diptych::command!(RegisterUser, id = user_id);
diptych::command!(
    UnfollowUser,
    id = user_id,
    aggregate = User,
    into = UserCommand::Unfollow
);

/// What happened to a user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    /// A user joined.
    UserRegistered {
        /// The user.
        user_id: String,
        /// Their handle, as they wrote it.
        handle: String,
        /// The name shown.
        display_name: String,
        /// Their bio.
        bio: String,
    },
    /// A user follows another.
    UserFollowed {
        /// The follower.
        user_id: String,
        /// Whom they follow.
        target_id: String,
    },
    /// A user no longer follows another.
    UserUnfollowed {
        /// The follower.
        user_id: String,
        /// Whom they followed.
        target_id: String,
    },
}

/// A user: whether they exist and whom they follow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Registered.
    pub exists: bool,
    /// Their handle.
    pub handle: String,
    /// Whom they follow.
    pub following: BTreeSet<String>,
}

impl Aggregate for User {
    const KIND: &'static str = "user";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = Rejection;

    fn decide(&self, command: &UserCommand) -> Result<Vec<UserEvent>, Rejection> {
        match command {
            UserCommand::Register(register) => {
                if self.exists {
                    return Err(Rejection::UserExists);
                }
                register.check()?;
                Ok(vec![UserEvent::UserRegistered {
                    user_id: register.user_id.clone(),
                    handle: register.handle.clone(),
                    display_name: register.display_name.clone(),
                    bio: register.bio.clone(),
                }])
            }
            UserCommand::Follow(follow) => {
                if !self.exists {
                    return Err(Rejection::UserNotFound);
                }
                if follow.target_id == follow.user_id {
                    return Err(Rejection::CannotFollowSelf);
                }
                if self.following.contains(&follow.target_id) {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::UserFollowed {
                    user_id: follow.user_id.clone(),
                    target_id: follow.target_id.clone(),
                }])
            }
            UserCommand::Unfollow(unfollow) => {
                if !self.exists {
                    return Err(Rejection::UserNotFound);
                }
                if !self.following.contains(&unfollow.target_id) {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::UserUnfollowed {
                    user_id: unfollow.user_id.clone(),
                    target_id: unfollow.target_id.clone(),
                }])
            }
        }
    }

    fn evolve(&mut self, event: &UserEvent) {
        match event {
            UserEvent::UserRegistered { handle, .. } => {
                self.exists = true;
                self.handle.clone_from(handle);
            }
            UserEvent::UserFollowed { target_id, .. } => {
                self.following.insert(target_id.clone());
            }
            UserEvent::UserUnfollowed { target_id, .. } => {
                self.following.remove(target_id);
            }
        }
    }
}

/// A handle, claimed by one user for good. Its stream is the handle in lower
/// case (`handle-ada`), so `Ada` and `ada` are one handle, and two registrations
/// racing for it meet on one stream's version check.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Handle {
    /// The user who holds it.
    pub owner: Option<String>,
}

/// Claims a handle for a user.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimHandle {
    /// The handle, as written.
    pub handle: String,
    /// The user.
    pub user_id: String,
}

/// What happened to a handle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HandleEvent {
    /// A user holds the handle from now on.
    HandleClaimed {
        /// The handle, as written.
        handle: String,
        /// The user.
        user_id: String,
    },
}

impl Aggregate for Handle {
    const KIND: &'static str = "handle";
    type Command = ClaimHandle;
    type Event = HandleEvent;
    type Error = Rejection;

    fn decide(&self, claim: &ClaimHandle) -> Result<Vec<HandleEvent>, Rejection> {
        match &self.owner {
            Some(owner) if *owner == claim.user_id => Ok(vec![]),
            Some(_) => Err(Rejection::HandleTaken),
            None => Ok(vec![HandleEvent::HandleClaimed {
                handle: claim.handle.clone(),
                user_id: claim.user_id.clone(),
            }]),
        }
    }

    fn evolve(&mut self, HandleEvent::HandleClaimed { user_id, .. }: &HandleEvent) {
        self.owner = Some(user_id.clone());
    }
}

/// The id of a handle's stream: the handle in lower case.
pub fn handle_key(handle: &str) -> String {
    handle.to_lowercase()
}

/// A handle is 1 to 30 letters, digits or `_`.
pub fn check_handle(handle: &str) -> Result<(), Rejection> {
    let fits = !handle.is_empty()
        && handle.chars().count() <= 30
        && handle.chars().all(|c| c.is_alphanumeric() || c == '_');
    if fits {
        Ok(())
    } else {
        Err(Rejection::Invalid {
            field: "handle",
            reason: "must be 1 to 30 letters, digits or `_`".to_owned(),
        })
    }
}

/// A text of `min` to `max` characters, not only blanks when one is required.
pub fn check_text(
    field: &'static str,
    text: &str,
    min: usize,
    max: usize,
) -> Result<(), Rejection> {
    let length = text.chars().count();
    if min > 0 && text.trim().is_empty() {
        return Err(Rejection::Invalid {
            field,
            reason: "must not be empty".to_owned(),
        });
    }
    if length > max {
        return Err(Rejection::Invalid {
            field,
            reason: format!("must be at most {max} characters, not {length}"),
        });
    }
    Ok(())
}
