use super::*;

/// RFC 4231, test case 2: HMAC-SHA256 of this body under this key.
const KEY: &[u8] = b"Jefe";
const BODY: &[u8] = b"what do ya want for nothing?";
const MAC: &str = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";

/// A header lookup over `(name, value)` pairs, ignoring case like HTTP.
fn headers<'h>(pairs: &'h [(&'h str, &'h str)]) -> impl Fn(&str) -> Option<&'h str> {
    move |name| {
        pairs
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| *value)
    }
}

#[test]
fn github_and_gitea_signatures_verify() {
    let github = format!("sha256={MAC}");
    assert_eq!(
        verify_signature(KEY, BODY, headers(&[("x-hub-signature-256", &github)])),
        Ok(())
    );
    assert_eq!(
        verify_signature(KEY, BODY, headers(&[("X-Gitea-Signature", MAC)])),
        Ok(())
    );
    assert_eq!(
        verify_signature(KEY, BODY, headers(&[("X-Forgejo-Signature", MAC)])),
        Ok(())
    );
    // Gitea sends both; both must hold.
    let upper = MAC.to_uppercase();
    assert_eq!(
        verify_signature(
            KEY,
            BODY,
            headers(&[
                ("X-Hub-Signature-256", &github),
                ("X-Gitea-Signature", &upper)
            ])
        ),
        Ok(())
    );
}

#[test]
fn wrong_or_missing_signatures_are_refused() {
    assert_eq!(
        verify_signature(KEY, BODY, headers(&[("X-GitHub-Event", "push")])),
        Err(WebhookError::MissingSignature)
    );
    let bad = WebhookError::BadSignature {
        header: GITEA_SIGNATURE_HEADER,
    };
    assert_eq!(
        verify_signature(b"other", BODY, headers(&[("X-Gitea-Signature", MAC)])),
        Err(bad.clone())
    );
    assert_eq!(
        verify_signature(
            KEY,
            b"what do ya want for nothing!",
            headers(&[("X-Gitea-Signature", MAC)])
        ),
        Err(bad.clone())
    );
    assert_eq!(
        verify_signature(KEY, BODY, headers(&[("X-Gitea-Signature", &MAC[..32])])),
        Err(bad.clone()),
        "a truncated signature is not a prefix match"
    );
    let github = format!("sha256={MAC}");
    assert_eq!(
        verify_signature(
            KEY,
            BODY,
            headers(&[
                ("X-Hub-Signature-256", &github),
                ("X-Gitea-Signature", "00")
            ])
        ),
        Err(bad),
        "every signature present must hold"
    );
    assert_eq!(
        verify_signature(KEY, BODY, headers(&[("X-Hub-Signature-256", MAC)])),
        Err(WebhookError::MalformedSignature {
            header: GITHUB_SIGNATURE_HEADER,
            reason: "it must start with `sha256=`".to_owned()
        })
    );
    assert_eq!(
        verify_signature(KEY, BODY, headers(&[("X-Gitea-Signature", "zz")])),
        Err(WebhookError::MalformedSignature {
            header: GITEA_SIGNATURE_HEADER,
            reason: "the signature must be hexadecimal".to_owned()
        })
    );
}

const COMMIT: &str = "9fceb02d0ae598e95dc970b74767f19372d61af8";

/// A GitHub push payload, trimmed to the fields that matter plus a few that
/// do not.
fn github_push(git_ref: &str, after: &str) -> String {
    serde_json::json!({
        "ref": git_ref,
        "before": "0000000000000000000000000000000000000000",
        "after": after,
        "created": false,
        "repository": {
            "full_name": "acme/models",
            "clone_url": "https://github.example/acme/models.git"
        },
        "pusher": { "name": "ada", "email": "ada@example.com" },
        "sender": { "login": "ada-gh" },
        "commits": []
    })
    .to_string()
}

/// A Gitea push payload: its pusher has `login` and `username`, no `name`.
fn gitea_push() -> String {
    serde_json::json!({
        "ref": "refs/heads/release/1.2",
        "after": COMMIT.to_uppercase(),
        "repository": {
            "full_name": "acme/models",
            "clone_url": "https://gitea.example/acme/models.git"
        },
        "pusher": { "id": 1, "login": "grace", "username": "grace", "full_name": "" },
        "sender": { "login": "grace" }
    })
    .to_string()
}

#[test]
fn branch_pushes_become_a_push() {
    assert_eq!(
        parse_push(github_push("refs/heads/main", COMMIT).as_bytes()),
        Ok(PushEvent::Branch(Push {
            branch: "main".to_owned(),
            commit: COMMIT.to_owned(),
            pusher: "ada".to_owned(),
            repository: "acme/models".to_owned(),
            clone_url: "https://github.example/acme/models.git".to_owned(),
        }))
    );
    let Ok(PushEvent::Branch(push)) = parse_push(gitea_push().as_bytes()) else {
        panic!("a gitea branch push");
    };
    assert_eq!(push.branch, "release/1.2");
    assert_eq!(push.commit, COMMIT, "commit ids are lowercased");
    assert_eq!(push.pusher, "grace");
}

#[test]
fn tags_deletions_and_other_refs_are_ignored_with_a_reason() {
    let zeros = "0".repeat(40);
    for (git_ref, after, ignored) in [
        ("refs/tags/v1.0", COMMIT, Ignored::Tag("v1.0".to_owned())),
        (
            "refs/tags/v1.0",
            zeros.as_str(),
            Ignored::Tag("v1.0".to_owned()),
        ),
        (
            "refs/heads/old",
            zeros.as_str(),
            Ignored::BranchDeleted("old".to_owned()),
        ),
        (
            "refs/notes/commits",
            COMMIT,
            Ignored::OtherRef("refs/notes/commits".to_owned()),
        ),
    ] {
        assert_eq!(
            parse_push(github_push(git_ref, after).as_bytes()),
            Ok(PushEvent::Ignored(ignored))
        );
    }
    assert_eq!(
        Ignored::BranchDeleted("old".to_owned()).to_string(),
        "branch `old` was deleted, so there is nothing to build"
    );
}

#[test]
fn malformed_payloads_name_the_path() {
    let malformed = |path: &str, reason: &str| {
        Err(WebhookError::MalformedPayload {
            path: path.to_owned(),
            reason: reason.to_owned(),
        })
    };
    let without = |pointer: &[&str]| {
        let mut document: Value =
            serde_json::from_str(&github_push("refs/heads/main", COMMIT)).unwrap();
        let (last, parents) = pointer.split_last().unwrap();
        let parent = parents
            .iter()
            .fold(&mut document, |value, key| &mut value[*key]);
        parent.as_object_mut().unwrap().remove(*last);
        document.to_string()
    };
    assert_eq!(
        parse_push(without(&["repository", "full_name"]).as_bytes()),
        malformed("repository.full_name", "is missing")
    );
    assert_eq!(
        parse_push(without(&["ref"]).as_bytes()),
        malformed("ref", "is missing")
    );
    let no_pusher = without(&["pusher"]);
    let Ok(PushEvent::Branch(push)) = parse_push(no_pusher.as_bytes()) else {
        panic!("sender.login stands in for the pusher");
    };
    assert_eq!(push.pusher, "ada-gh");
    let mut nobody: Value = serde_json::from_str(&no_pusher).unwrap();
    nobody.as_object_mut().unwrap().remove("sender");
    assert_eq!(
        parse_push(nobody.to_string().as_bytes()),
        malformed(
            "pusher",
            "no `pusher.name`, `pusher.username`, `pusher.login` or `sender.login`"
        )
    );
    assert_eq!(
        parse_push(br#"{"ref": 7, "after": "x"}"#),
        malformed("ref", "must be a string")
    );
    assert_eq!(
        parse_push(github_push("refs/heads/main", "abc").as_bytes()),
        malformed("after", "`abc` is not a commit id (40 or 64 hex digits)")
    );
    let Err(WebhookError::MalformedPayload { path, reason }) = parse_push(b"{\"ref\":") else {
        panic!("truncated json");
    };
    assert_eq!(path, "");
    assert!(
        reason.starts_with("not JSON (EOF while parsing"),
        "{reason}"
    );
}

#[test]
fn branch_patterns() {
    for (pattern, branch, expected) in [
        ("main", "main", true),
        ("main", "main2", false),
        ("main", "mai", false),
        ("*", "anything/at/all", true),
        ("{main,develop}", "develop", true),
        ("{main,develop}", "feature", false),
        ("release/*", "release/1.2", true),
        ("release/*", "release/1.2/hotfix", true),
        ("release/*", "release/", true),
        ("release/*", "release", false),
        ("release/*", "prerelease/1", false),
        ("*-rc", "v1-rc", true),
        ("*-rc", "v1-rc1", false),
        ("feat/*/ui", "feat/a/b/ui", true),
        ("a*b*c", "aXbYbZc", true),
        ("a*b*c", "aXcYb", false),
        ("**", "x", true),
        ("", "", true),
    ] {
        assert_eq!(
            branch_matches(pattern, branch),
            expected,
            "{pattern} ~ {branch}"
        );
    }
    // No backtracking blow-up.
    let branch = "a".repeat(10_000);
    assert!(!branch_matches(&format!("{}b", "*a".repeat(50)), &branch));
}

#[test]
fn branch_pattern_rules() {
    for good in ["main", "release/*", "*", "feat/x-1.2_3"] {
        assert_eq!(check_branch_pattern(good), Ok(()), "{good}");
    }
    for bad in [
        "",
        "refs/heads/main",
        "a b",
        "a..b",
        "/main",
        "main/",
        "a:b",
        "a?",
        "a[1]",
        "a~1",
        "a^",
    ] {
        assert!(check_branch_pattern(bad).is_err(), "{bad:?}");
    }
}
