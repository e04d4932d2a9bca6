//! Posts, their comments and their likes, all in the post's stream.

use std::collections::BTreeSet;

use diptych::Aggregate;
use serde::{Deserialize, Serialize};

use crate::Rejection;
use crate::users::check_text;

/// The longest post or comment, in characters.
pub const MAX_TEXT: usize = 500;

/// `CreatePost`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePost {
    /// The new post's id.
    pub post_id: String,
    /// Who writes it.
    pub author_id: String,
    /// What it says: 1 to 500 characters.
    pub text: String,
}

/// `CommentOnPost`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommentOnPost {
    /// The new comment's id.
    pub comment_id: String,
    /// The post.
    pub post_id: String,
    /// Who writes it.
    pub author_id: String,
    /// What it says: 1 to 500 characters.
    pub text: String,
}

/// `LikePost`: a second like by the same user changes nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LikePost {
    /// The post.
    pub post_id: String,
    /// Who likes it.
    pub user_id: String,
}

/// `DeletePost`: only its author may.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletePost {
    /// The post.
    pub post_id: String,
    /// Who asks: must be its author.
    pub author_id: String,
}

/// What a post is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub enum PostCommand {
    /// See [`CreatePost`].
    Create(CreatePost),
    /// See [`CommentOnPost`].
    Comment(CommentOnPost),
    /// See [`LikePost`].
    Like(LikePost),
    /// See [`DeletePost`].
    Delete(DeletePost),
}

impl PostCommand {
    /// The post it addresses.
    pub fn post_id(&self) -> &str {
        match self {
            PostCommand::Create(command) => &command.post_id,
            PostCommand::Comment(command) => &command.post_id,
            PostCommand::Like(command) => &command.post_id,
            PostCommand::Delete(command) => &command.post_id,
        }
    }

    /// The rules of its input alone, before anything is looked up.
    pub fn check(&self) -> Result<(), Rejection> {
        match self {
            PostCommand::Create(create) => check_text("text", &create.text, 1, MAX_TEXT),
            PostCommand::Comment(comment) => {
                check_text("comment_id", &comment.comment_id, 1, 200)?;
                check_text("text", &comment.text, 1, MAX_TEXT)
            }
            PostCommand::Like(_) | PostCommand::Delete(_) => Ok(()),
        }
    }
}

// Writing, commenting and liking need the user to exist: the application's
// own handlers look first.
diptych::command!(CreatePost, id = post_id);
diptych::command!(CommentOnPost, id = post_id);
diptych::command!(LikePost, id = post_id);
diptych::command!(
    DeletePost,
    id = post_id,
    aggregate = Post,
    into = PostCommand::Delete
);

/// What happened to a post.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PostEvent {
    /// A post was written.
    PostCreated {
        /// The post.
        post_id: String,
        /// Its author.
        author_id: String,
        /// What it says.
        text: String,
    },
    /// A comment was added to it.
    CommentAdded {
        /// The comment.
        comment_id: String,
        /// The post.
        post_id: String,
        /// The comment's author.
        author_id: String,
        /// What it says.
        text: String,
    },
    /// A user liked it.
    PostLiked {
        /// The post.
        post_id: String,
        /// Who.
        user_id: String,
    },
    /// Its author deleted it.
    PostDeleted {
        /// The post.
        post_id: String,
        /// Its author.
        author_id: String,
    },
}

/// A post, as its rules need it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Post {
    /// Written.
    pub exists: bool,
    /// Deleted since.
    pub deleted: bool,
    /// Its author.
    pub author_id: String,
    /// Who liked it.
    pub likes: BTreeSet<String>,
    /// Its comments' ids.
    pub comments: BTreeSet<String>,
}

impl Post {
    fn readable(&self) -> Result<(), Rejection> {
        if self.exists && !self.deleted {
            Ok(())
        } else {
            Err(Rejection::PostNotFound)
        }
    }
}

impl Aggregate for Post {
    const KIND: &'static str = "post";
    type Command = PostCommand;
    type Event = PostEvent;
    type Error = Rejection;

    fn decide(&self, command: &PostCommand) -> Result<Vec<PostEvent>, Rejection> {
        match command {
            PostCommand::Create(create) => {
                if self.exists {
                    return Err(Rejection::PostExists);
                }
                command.check()?;
                Ok(vec![PostEvent::PostCreated {
                    post_id: create.post_id.clone(),
                    author_id: create.author_id.clone(),
                    text: create.text.clone(),
                }])
            }
            PostCommand::Comment(comment) => {
                self.readable()?;
                command.check()?;
                if self.comments.contains(&comment.comment_id) {
                    return Ok(vec![]);
                }
                Ok(vec![PostEvent::CommentAdded {
                    comment_id: comment.comment_id.clone(),
                    post_id: comment.post_id.clone(),
                    author_id: comment.author_id.clone(),
                    text: comment.text.clone(),
                }])
            }
            PostCommand::Like(like) => {
                self.readable()?;
                if self.likes.contains(&like.user_id) {
                    return Ok(vec![]);
                }
                Ok(vec![PostEvent::PostLiked {
                    post_id: like.post_id.clone(),
                    user_id: like.user_id.clone(),
                }])
            }
            PostCommand::Delete(delete) => {
                self.readable()?;
                if delete.author_id != self.author_id {
                    return Err(Rejection::NotAuthor);
                }
                Ok(vec![PostEvent::PostDeleted {
                    post_id: delete.post_id.clone(),
                    author_id: self.author_id.clone(),
                }])
            }
        }
    }

    fn evolve(&mut self, event: &PostEvent) {
        match event {
            PostEvent::PostCreated { author_id, .. } => {
                self.exists = true;
                self.author_id.clone_from(author_id);
            }
            PostEvent::CommentAdded { comment_id, .. } => {
                self.comments.insert(comment_id.clone());
            }
            PostEvent::PostLiked { user_id, .. } => {
                self.likes.insert(user_id.clone());
            }
            PostEvent::PostDeleted { .. } => self.deleted = true,
        }
    }
}
