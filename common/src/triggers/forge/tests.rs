//! Deliveries shaped as each forge documents them (trimmed to the fields
//! that matter, plus a few Kiln ignores).

use serde_json::json;

use super::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn read_with(headers: &[(&str, &str)], body: &serde_json::Value) -> Delivery {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| *value)
    };
    read(header, body.to_string().as_bytes()).unwrap()
}

#[test]
fn github_push_tag_and_pull_request() {
    let push = read_with(
        &[("X-GitHub-Event", "push"), ("X-GitHub-Delivery", "d-1")],
        // No repository at all: Kiln builds from the registered one.
        &json!({"ref": "refs/heads/main", "after": COMMIT, "pusher": {"name": "ada"}}),
    );
    assert_eq!(push.id.as_deref(), Some("d-1"));
    let ForgeEvent::Push(push) = push.event else {
        panic!("{push:?}")
    };
    assert_eq!(
        (push.branch.as_str(), push.pusher.as_str()),
        ("main", "ada")
    );

    let tag = read_with(
        &[("X-GitHub-Event", "push")],
        &json!({"ref": "refs/tags/v1.2", "after": COMMIT, "sender": {"login": "ada"}}),
    );
    assert_eq!(
        tag.event,
        ForgeEvent::Tag(TagPush {
            tag: "v1.2".into(),
            commit: COMMIT.into(),
            pusher: "ada".into()
        })
    );

    let pr = json!({
        "action": "synchronize", "number": 7,
        "pull_request": {"head": {"sha": COMMIT, "ref": "feature"}, "base": {"ref": "main"}},
        "sender": {"login": "bob"}
    });
    let ForgeEvent::MergeRequest(request) =
        read_with(&[("X-GitHub-Event", "pull_request")], &pr).event
    else {
        panic!()
    };
    assert_eq!(
        (
            request.id,
            request.source_branch.as_str(),
            request.target_branch.as_str()
        ),
        (7, "feature", "main")
    );
    let closed = json!({"action": "closed", "number": 7});
    assert!(matches!(
        read_with(&[("X-GitHub-Event", "pull_request")], &closed).event,
        ForgeEvent::Ignored(_)
    ));
}

#[test]
fn gitea_pull_requests_say_synchronized() {
    let pr = json!({
        "action": "synchronized", "number": 3,
        "pull_request": {"number": 3, "head": {"sha": COMMIT, "ref": "fix"}, "base": {"ref": "main"}}
    });
    let delivery = read_with(
        &[
            ("X-Gitea-Event", "pull_request"),
            ("X-Gitea-Delivery", "g-9"),
        ],
        &pr,
    );
    assert_eq!(delivery.id.as_deref(), Some("g-9"));
    assert!(matches!(
        delivery.event,
        ForgeEvent::MergeRequest(MergeRequest { id: 3, .. })
    ));
}

#[test]
fn gitlab_push_tag_and_merge_request() {
    let headers = [
        ("X-Gitlab-Event", "Push Hook"),
        ("X-Gitlab-Event-UUID", "u-1"),
    ];
    let push = read_with(
        &headers,
        &json!({"object_kind": "push", "ref": "refs/heads/main", "before": "0".repeat(40),
                "after": COMMIT, "checkout_sha": COMMIT, "user_username": "ada"}),
    );
    assert_eq!(push.id.as_deref(), Some("u-1"));
    let ForgeEvent::Push(push) = push.event else {
        panic!()
    };
    assert_eq!(
        (push.branch.as_str(), push.pusher.as_str()),
        ("main", "ada")
    );

    let tag_object = "f".repeat(40);
    let tag = read_with(
        &[("X-Gitlab-Event", "Tag Push Hook")],
        &json!({"object_kind": "tag_push", "ref": "refs/tags/v2", "after": tag_object,
                "checkout_sha": COMMIT}),
    );
    assert_eq!(
        tag.event,
        ForgeEvent::Tag(TagPush {
            tag: "v2".into(),
            commit: COMMIT.into(),
            pusher: "unknown".into()
        })
    );

    let mr = json!({"object_kind": "merge_request", "user": {"username": "bob"},
        "object_attributes": {"iid": 12, "action": "open", "source_branch": "feat",
            "target_branch": "main", "last_commit": {"id": COMMIT}}});
    let ForgeEvent::MergeRequest(request) =
        read_with(&[("X-Gitlab-Event", "Merge Request Hook")], &mr).event
    else {
        panic!()
    };
    assert_eq!((request.id, request.author.as_str()), (12, "bob"));
    let merged = json!({"object_kind": "merge_request",
        "object_attributes": {"iid": 12, "action": "merge"}});
    assert!(matches!(
        read_with(&[("X-Gitlab-Event", "Merge Request Hook")], &merged).event,
        ForgeEvent::Ignored(_)
    ));
}

#[test]
fn a_missing_commit_names_its_path() {
    let header = |name: &str| (name == "X-GitHub-Event").then_some("pull_request");
    let body = json!({"action": "opened", "number": 1, "pull_request": {"head": {"ref": "x"}}});
    let error = read(header, body.to_string().as_bytes()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "malformed push payload at `pull_request.head.sha`: is missing"
    );
}
