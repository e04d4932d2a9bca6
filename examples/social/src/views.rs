//! The social network's views.
//!
//! | view | key | answers |
//! |---|---|---|
//! | `profiles` | user id | handle, display name, bio, followers, following, posts |
//! | `posts` | post id | text (full-text search: `posts?q=word`), author and handle, likes, comments with their authors' handles |
//! | `feeds` | `<reader>/<post id>` | a reader's news feed: `feeds?user_id=U&order=-created_at_us&limit=N` |
//!
//! Feeds are written on fan-out: a post becomes one document per follower of its
//! author, so reading a feed is one indexed query however many users a reader
//! follows. Following someone brings their 20 latest posts in; unfollowing takes
//! every post of theirs out; a deleted post leaves every feed.

use async_trait::async_trait;
use diptych::{
    CollectionSpec, EventSet, HandlerError, RecordedEvent, TypedProjection, ViewError, ViewTx,
};
use serde::{Deserialize, Serialize};

use crate::posts::{Post, PostEvent};
use crate::users::{User, UserEvent};

/// How many of an author's latest posts a new follower's feed receives.
pub const FEED_BACKFILL: usize = 20;

/// The events the views read.
pub enum SocialEvent {
    /// A user's.
    User(UserEvent),
    /// A post's.
    Post(PostEvent),
}

fn social_events() -> EventSet<SocialEvent> {
    EventSet::new()
        .aggregate::<User>(SocialEvent::User)
        .aggregate::<Post>(SocialEvent::Post)
}

/// One document of `profiles`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileDocument {
    /// The user.
    pub user_id: String,
    /// Their handle.
    pub handle: String,
    /// The name shown.
    pub display_name: String,
    /// Their bio.
    pub bio: String,
    /// How many follow them.
    pub followers: u64,
    /// How many they follow.
    pub following: u64,
    /// How many posts they have (not deleted).
    pub posts: u64,
}

/// Keeps `profiles`.
pub struct ProfilesView {
    events: EventSet<SocialEvent>,
}

impl Default for ProfilesView {
    fn default() -> Self {
        Self {
            events: social_events(),
        }
    }
}

#[async_trait]
impl TypedProjection for ProfilesView {
    type Event = SocialEvent;

    fn name(&self) -> &str {
        "profiles"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![
            CollectionSpec::new("profiles")
                .index("handle")
                .index("followers"),
        ]
    }

    fn events(&self) -> &EventSet<SocialEvent> {
        &self.events
    }

    async fn apply(
        &self,
        event: SocialEvent,
        _: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError> {
        match event {
            SocialEvent::User(UserEvent::UserRegistered {
                user_id,
                handle,
                display_name,
                bio,
            }) => {
                views
                    .upsert("profiles", &user_id, |doc: &mut ProfileDocument| {
                        doc.user_id.clone_from(&user_id);
                        doc.handle = handle;
                        doc.display_name = display_name;
                        doc.bio = bio;
                    })
                    .await?;
            }
            SocialEvent::User(UserEvent::UserFollowed { user_id, target_id }) => {
                profile(views, &user_id, |doc| doc.following += 1).await?;
                profile(views, &target_id, |doc| doc.followers += 1).await?;
            }
            SocialEvent::User(UserEvent::UserUnfollowed { user_id, target_id }) => {
                profile(views, &user_id, |doc| {
                    doc.following = doc.following.saturating_sub(1);
                })
                .await?;
                profile(views, &target_id, |doc| {
                    doc.followers = doc.followers.saturating_sub(1);
                })
                .await?;
            }
            SocialEvent::Post(PostEvent::PostCreated { author_id, .. }) => {
                profile(views, &author_id, |doc| doc.posts += 1).await?;
            }
            SocialEvent::Post(PostEvent::PostDeleted { author_id, .. }) => {
                profile(views, &author_id, |doc| {
                    doc.posts = doc.posts.saturating_sub(1);
                })
                .await?;
            }
            SocialEvent::Post(_) => {}
        }
        Ok(())
    }
}

/// Changes the profile of a registered user.
async fn profile(
    views: &mut ViewTx,
    user_id: &str,
    change: impl FnOnce(&mut ProfileDocument),
) -> Result<bool, ViewError> {
    views.update("profiles", user_id, change).await
}

/// A user's handle, as the views that name authors keep it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Known {
    handle: String,
}

/// The handle of `user_id` from `collection`, empty when unknown.
async fn handle_of(
    views: &mut ViewTx,
    collection: &str,
    user_id: &str,
) -> Result<String, ViewError> {
    Ok(views
        .get::<Known>(collection, user_id)
        .await?
        .map(|known| known.handle)
        .unwrap_or_default())
}

/// One comment of a post.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommentDocument {
    /// The comment.
    pub comment_id: String,
    /// Its author.
    pub author_id: String,
    /// Their handle.
    pub author_handle: String,
    /// What it says.
    pub text: String,
}

/// One document of `posts`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PostDocument {
    /// The post.
    pub post_id: String,
    /// Its author.
    pub author_id: String,
    /// Their handle.
    pub author_handle: String,
    /// What it says.
    pub text: String,
    /// How many users like it.
    pub likes: u64,
    /// Its comments, oldest first.
    pub comments: Vec<CommentDocument>,
    /// When it was written, µs since the epoch.
    pub created_at_us: i64,
}

/// Keeps `posts`, and the handles it names authors by (`posts-handles`).
pub struct PostsView {
    events: EventSet<SocialEvent>,
}

impl Default for PostsView {
    fn default() -> Self {
        Self {
            events: social_events(),
        }
    }
}

#[async_trait]
impl TypedProjection for PostsView {
    type Event = SocialEvent;

    fn name(&self) -> &str {
        "posts"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![
            CollectionSpec::new("posts")
                .index("author_id")
                .index("created_at_us")
                .text("text"),
            CollectionSpec::new("posts-handles"),
        ]
    }

    fn events(&self) -> &EventSet<SocialEvent> {
        &self.events
    }

    async fn apply(
        &self,
        event: SocialEvent,
        envelope: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError> {
        match event {
            SocialEvent::User(UserEvent::UserRegistered {
                user_id, handle, ..
            }) => views.put("posts-handles", &user_id, &Known { handle })?,
            SocialEvent::Post(PostEvent::PostCreated {
                post_id,
                author_id,
                text,
            }) => {
                let author_handle = handle_of(views, "posts-handles", &author_id).await?;
                let document = PostDocument {
                    post_id: post_id.clone(),
                    author_id,
                    author_handle,
                    text,
                    likes: 0,
                    comments: Vec::new(),
                    created_at_us: envelope.recorded_at.as_unix_micros(),
                };
                views.put("posts", &post_id, &document)?;
            }
            SocialEvent::Post(PostEvent::CommentAdded {
                comment_id,
                post_id,
                author_id,
                text,
            }) => {
                let author_handle = handle_of(views, "posts-handles", &author_id).await?;
                let comment = CommentDocument {
                    comment_id,
                    author_id,
                    author_handle,
                    text,
                };
                views
                    .update("posts", &post_id, |post: &mut PostDocument| {
                        post.comments.push(comment)
                    })
                    .await?;
            }
            SocialEvent::Post(PostEvent::PostLiked { post_id, .. }) => {
                views
                    .update("posts", &post_id, |post: &mut PostDocument| post.likes += 1)
                    .await?;
            }
            SocialEvent::Post(PostEvent::PostDeleted { post_id, .. }) => {
                views.delete("posts", &post_id)?;
            }
            SocialEvent::User(_) => {}
        }
        Ok(())
    }
}

/// One document of `feeds`: a post in a reader's feed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedDocument {
    /// The reader whose feed it is in.
    pub user_id: String,
    /// The post.
    pub post_id: String,
    /// Its author.
    pub author_id: String,
    /// Their handle.
    pub author_handle: String,
    /// What it says.
    pub text: String,
    /// When it was written, µs since the epoch.
    pub created_at_us: i64,
}

/// An author's followers, as the fan-out reads them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Followers {
    user_ids: Vec<String>,
}

/// Every live post of one author, oldest first: a new follower's feed gets the
/// latest of them, and an unfollow takes them all out of the reader's feed
/// (deleting one that never was there changes nothing).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Authored {
    post_ids: Vec<String>,
}

/// Keeps `feeds`, with its own indexes: followers by author
/// (`feeds-followers`), each live post as a feed shows it (`feeds-posts`), every
/// live post by author (`feeds-authored`) and handles (`feeds-handles`). A post
/// costs one document per follower and nothing more per follower.
pub struct FeedsView {
    events: EventSet<SocialEvent>,
}

impl Default for FeedsView {
    fn default() -> Self {
        Self {
            events: social_events(),
        }
    }
}

fn feed_key(reader: &str, post_id: &str) -> String {
    format!("{reader}/{post_id}")
}

/// Puts `post` into `reader`'s feed.
fn add_to_feed(views: &mut ViewTx, reader: &str, post: &FeedDocument) -> Result<(), ViewError> {
    let document = FeedDocument {
        user_id: reader.to_owned(),
        ..post.clone()
    };
    views.put("feeds", &feed_key(reader, &post.post_id), &document)
}

#[async_trait]
impl TypedProjection for FeedsView {
    type Event = SocialEvent;

    fn name(&self) -> &str {
        "feeds"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![
            CollectionSpec::new("feeds")
                .index("user_id")
                .index("created_at_us"),
            CollectionSpec::new("feeds-followers"),
            CollectionSpec::new("feeds-posts"),
            CollectionSpec::new("feeds-authored"),
            CollectionSpec::new("feeds-handles"),
        ]
    }

    fn events(&self) -> &EventSet<SocialEvent> {
        &self.events
    }

    async fn apply(
        &self,
        event: SocialEvent,
        envelope: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError> {
        match event {
            SocialEvent::User(UserEvent::UserRegistered {
                user_id, handle, ..
            }) => views.put("feeds-handles", &user_id, &Known { handle })?,
            SocialEvent::Post(PostEvent::PostCreated {
                post_id,
                author_id,
                text,
            }) => {
                let post = FeedDocument {
                    user_id: String::new(),
                    post_id,
                    author_handle: handle_of(views, "feeds-handles", &author_id).await?,
                    author_id,
                    text,
                    created_at_us: envelope.recorded_at.as_unix_micros(),
                };
                let followers: Followers = views
                    .get("feeds-followers", &post.author_id)
                    .await?
                    .unwrap_or_default();
                for reader in &followers.user_ids {
                    add_to_feed(views, reader, &post)?;
                }
                views
                    .upsert(
                        "feeds-authored",
                        &post.author_id,
                        |authored: &mut Authored| authored.post_ids.push(post.post_id.clone()),
                    )
                    .await?;
                views.put("feeds-posts", &post.post_id, &post)?;
            }
            SocialEvent::User(UserEvent::UserFollowed { user_id, target_id }) => {
                views
                    .upsert(
                        "feeds-followers",
                        &target_id,
                        |followers: &mut Followers| {
                            if !followers.user_ids.contains(&user_id) {
                                followers.user_ids.push(user_id.clone());
                            }
                        },
                    )
                    .await?;
                let authored: Authored = views
                    .get("feeds-authored", &target_id)
                    .await?
                    .unwrap_or_default();
                let skip = authored.post_ids.len().saturating_sub(FEED_BACKFILL);
                let latest = &authored.post_ids[skip..];
                views.prefetch("feeds-posts", latest.iter().cloned()).await;
                for post_id in latest {
                    if let Some(post) = views.get::<FeedDocument>("feeds-posts", post_id).await? {
                        add_to_feed(views, &user_id, &post)?;
                    }
                }
            }
            SocialEvent::User(UserEvent::UserUnfollowed { user_id, target_id }) => {
                views
                    .update(
                        "feeds-followers",
                        &target_id,
                        |followers: &mut Followers| {
                            followers.user_ids.retain(|id| *id != user_id);
                        },
                    )
                    .await?;
                let authored: Authored = views
                    .get("feeds-authored", &target_id)
                    .await?
                    .unwrap_or_default();
                for post_id in &authored.post_ids {
                    views.delete("feeds", &feed_key(&user_id, post_id))?;
                }
            }
            SocialEvent::Post(PostEvent::PostDeleted { post_id, author_id }) => {
                let followers: Followers = views
                    .get("feeds-followers", &author_id)
                    .await?
                    .unwrap_or_default();
                for reader in &followers.user_ids {
                    views.delete("feeds", &feed_key(reader, &post_id))?;
                }
                views
                    .update("feeds-authored", &author_id, |authored: &mut Authored| {
                        authored.post_ids.retain(|id| *id != post_id)
                    })
                    .await?;
                views.delete("feeds-posts", &post_id)?;
            }
            SocialEvent::Post(_) => {}
        }
        Ok(())
    }
}
