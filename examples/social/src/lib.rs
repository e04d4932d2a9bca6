//! The seeds' social network on diptych: users follow users, write posts, comment
//! and like, and read a news feed of the posts of those they follow.
//!
//! Built with the public API only: two aggregates (`user-<id>`, `post-<id>`, a
//! post's comments and likes in its stream) and a third that holds each handle
//! (`handle-<handle in lower case>`), so handles stay unique whatever their case,
//! also when two registrations race; three views (`profiles`, `posts` with
//! full-text search, `feeds` written on fan-out, one document per follower and
//! post); and one [`diptych::Service`] that the HTTP layer and a
//! [`diptych`] node run.

pub mod posts;
pub mod users;
pub mod views;

use std::sync::Arc;

use diptych::{
    CommandContext, CommandError, CommandOutcome, EventStore, RejectionCode, Repository, ViewStore,
};

use crate::posts::{CommentOnPost, CreatePost, DeletePost, LikePost, Post, PostCommand};
use crate::users::{
    ClaimHandle, FollowUser, Handle, RegisterUser, UnfollowUser, User, UserCommand, handle_key,
};

/// Why the social network refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A field's value is not acceptable.
    #[error("`{field}` {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Another user holds that handle, in some case.
    #[error("that handle is taken")]
    HandleTaken,
    /// No user with that id.
    #[error("no user with that id")]
    UserNotFound,
    /// A user with that id exists already.
    #[error("a user with that id exists already")]
    UserExists,
    /// A user cannot follow themselves.
    #[error("a user cannot follow themselves")]
    CannotFollowSelf,
    /// No post with that id, or it was deleted.
    #[error("no post with that id")]
    PostNotFound,
    /// A post with that id exists already.
    #[error("a post with that id exists already")]
    PostExists,
    /// Only a post's author may do that.
    #[error("only the post's author may delete it")]
    NotAuthor,
}

impl RejectionCode for Rejection {
    fn code(&self) -> &'static str {
        match self {
            Rejection::Invalid { .. } => "invalid_field",
            Rejection::HandleTaken => "handle_taken",
            Rejection::UserNotFound => "user_not_found",
            Rejection::UserExists => "user_exists",
            Rejection::CannotFollowSelf => "cannot_follow_self",
            Rejection::PostNotFound => "post_not_found",
            Rejection::PostExists => "post_exists",
            Rejection::NotAuthor => "not_author",
        }
    }

    fn status(&self) -> u16 {
        if matches!(self, Rejection::Invalid { .. }) {
            400
        } else {
            422
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            Rejection::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// The views clients read.
pub const VIEWS: [&str; 3] = ["profiles", "posts", "feeds"];

/// The social network on an event store and a view store.
pub struct Social {
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    application: diptych::Service,
}

impl Social {
    /// The social network, named `social` in the broker's subjects.
    pub fn new(store: Arc<dyn EventStore>, views: Arc<dyn ViewStore>) -> Self {
        let rules = Rules {
            users: Repository::new(store.clone()),
            handles: Repository::new(store.clone()),
            posts: Repository::new(store.clone()),
        };
        Self {
            application: application(&rules),
            store,
            views,
        }
    }

    /// Its commands, states and handlers.
    pub fn application(&self) -> &diptych::Service {
        &self.application
    }

    /// The event store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The view store.
    pub fn views(&self) -> &Arc<dyn ViewStore> {
        &self.views
    }
}

/// The repositories the commands that look elsewhere first hold.
#[derive(Clone)]
struct Rules {
    users: Repository<User>,
    handles: Repository<Handle>,
    posts: Repository<Post>,
}

fn application(rules: &Rules) -> diptych::Service {
    let (registering, following, writing, commenting, liking) = (
        rules.clone(),
        rules.clone(),
        rules.clone(),
        rules.clone(),
        rules.clone(),
    );
    diptych::Service::builder("social")
        .aggregate(rules.users.clone())
        .aggregate(rules.handles.clone())
        .aggregate(rules.posts.clone())
        .command_with(move |register: RegisterUser, context: CommandContext| {
            let rules = registering.clone();
            async move { rules.register(register, &context).await }
        })
        .command_with(move |follow: FollowUser, context: CommandContext| {
            let rules = following.clone();
            async move { rules.follow(follow, &context).await }
        })
        .command::<UnfollowUser>()
        .command_with(move |create: CreatePost, context: CommandContext| {
            let (rules, user_id) = (writing.clone(), create.author_id.clone());
            async move {
                rules
                    .on_post(&user_id, PostCommand::Create(create), &context)
                    .await
            }
        })
        .command_with(move |comment: CommentOnPost, context: CommandContext| {
            let (rules, user_id) = (commenting.clone(), comment.author_id.clone());
            async move {
                rules
                    .on_post(&user_id, PostCommand::Comment(comment), &context)
                    .await
            }
        })
        .command_with(move |like: LikePost, context: CommandContext| {
            let (rules, user_id) = (liking.clone(), like.user_id.clone());
            async move {
                rules
                    .on_post(&user_id, PostCommand::Like(like), &context)
                    .await
            }
        })
        .command::<DeletePost>()
        .projection(Arc::new(views::ProfilesView::default()))
        .projection(Arc::new(views::PostsView::default()))
        .projection(Arc::new(views::FeedsView::default()))
        .build()
        .expect("the social network's commands, aggregates and views are each registered once")
}

impl Rules {
    /// A post command by a user who must exist; its input is checked first, so
    /// a bad text is a 400 whoever sends it.
    async fn on_post(
        &self,
        user_id: &str,
        command: PostCommand,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<Rejection>> {
        command.check().map_err(CommandError::Rejected)?;
        self.user_exists(user_id).await?;
        // The service checked the id is not blank before this handler ran.
        let post_id = command.post_id().to_owned();
        self.posts.execute(&post_id, &command, context).await
    }

    /// Refuses a user id that no registered user has.
    async fn user_exists(&self, user_id: &str) -> Result<(), CommandError<Rejection>> {
        if user_id.trim().is_empty() || !self.users.load(user_id).await?.state.exists {
            return Err(CommandError::Rejected(Rejection::UserNotFound));
        }
        Ok(())
    }

    /// Claims the handle for the user, then registers them. The claim has an id
    /// of its own derived from the command's, so a retried registration finds
    /// both its claim and its registration done.
    async fn register(
        &self,
        register: RegisterUser,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<Rejection>> {
        let user_id = register.user_id.clone();
        register.check().map_err(CommandError::Rejected)?;
        let user = self.users.load(&user_id).await?;
        if user.state.exists && user.state.handle != register.handle {
            return Err(CommandError::Rejected(Rejection::UserExists));
        }
        let mut claim_context =
            CommandContext::new(uuid::Uuid::new_v5(&context.command_id, b"claim-handle"));
        claim_context.correlation_id = Some(context.correlation_id.unwrap_or(context.command_id));
        claim_context.causation_id = Some(context.command_id);
        let claim = ClaimHandle {
            handle: register.handle.clone(),
            user_id: user_id.clone(),
        };
        self.handles
            .execute(&handle_key(&register.handle), &claim, &claim_context)
            .await?;
        self.users
            .execute(&user_id, &UserCommand::Register(register), context)
            .await
    }

    /// Follows a user who exists.
    async fn follow(
        &self,
        follow: FollowUser,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<Rejection>> {
        let user_id = follow.user_id.clone();
        if follow.target_id != user_id {
            self.user_exists(&follow.target_id).await?;
        }
        self.users
            .execute(&user_id, &UserCommand::Follow(follow), context)
            .await
    }
}
