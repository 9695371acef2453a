//! The configuration's tests: the embedded file and this README's table state exactly the
//! defaults in code; errors name their key; secrets expand and stay redacted.

use super::*;

fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, toml).unwrap();
    Config::load_with_env(
        Some(&p),
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[test]
fn embedded_default_is_a_docker_hub_mirror() {
    let c = Config::load_with_env(None, Vec::new()).unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:5000");
    assert_eq!(c.storage.root, std::path::PathBuf::from("./data"));
    assert_eq!(c.cache.tag_ttl, Duration::from_secs(300));
    assert_eq!(c.upstreams.len(), 1);
    assert_eq!(c.upstreams[0].name, "docker.io");
    assert_eq!(
        c.upstreams[0].url.to_string(),
        "https://registry-1.docker.io"
    );
    assert!(c.upstreams[0].default);
    assert!(c.upstreams[0].uses_library_prefix());
}

#[test]
fn empty_file_means_defaults_and_env_overrides() {
    let c = load_str(
        "",
        &[
            ("PULLCACHE_SERVER__LISTEN", "127.0.0.1:6000"),
            ("PULLCACHE_CACHE__TAG_TTL", "1h"),
            ("PULLCACHE_BIN", "/not/config"),
        ],
    )
    .unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:6000");
    assert_eq!(c.cache.tag_ttl, Duration::from_secs(3600));
    assert_eq!(c.upstreams[0].name, "docker.io");
}

#[test]
fn errors_name_the_key() {
    let e = load_str("[server]\nlisten = \"nonsense\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("server.listen"), "{e}");
    let e = load_str("[cache]\ntag_ttl = \"5 parsecs\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("tag_ttl"), "{e}");
    let e = load_str("[server]\nlisten_addr = \"x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("listen_addr"), "{e}");
    let e = load_str("[[upstreams]]\nname = \"a\"\nurl = \"ftp://x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("upstreams[0].url"), "{e}");
    let two = "[[upstreams]]\nname = \"a\"\nurl = \"http://a\"\ndefault = true\n[[upstreams]]\nname = \"b\"\nurl = \"http://b\"\ndefault = true\n";
    assert!(load_str(two, &[])
        .unwrap_err()
        .to_string()
        .contains("at most one"));
}

#[test]
fn credentials_expand_and_are_redacted() {
    std::env::set_var("PULLCACHE_TEST_SECRET_X", "hunter2");
    let c = load_str(
        "[[upstreams]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\nusername = \"me\"\npassword = \"${PULLCACHE_TEST_SECRET_X}\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.upstreams[0].password.expose(), "hunter2");
    let printed = c.to_redacted_toml();
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("***"));
    assert!(!format!("{c:?}").contains("hunter2"));
    let e = load_str("[[upstreams]]\nname = \"g\"\nurl = \"https://g\"\nusername = \"me\"\npassword = \"${PULLCACHE_TEST_UNSET_Y}\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("upstreams[0].password") && e.contains("PULLCACHE_TEST_UNSET_Y"),
        "{e}"
    );
}

#[test]
fn a_password_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pw");
    std::fs::write(&f, "s3cret-from-file\n").unwrap();
    let up = |extra: &str| {
        format!(
            "[[upstreams]]\nname = \"ghcr.io\"\nurl = \"https://ghcr.io\"\nusername = \"me\"\n{extra}\n"
        )
    };
    let c = load_str(
        &up(&format!("password_file = {:?}", f.display().to_string())),
        &[],
    )
    .unwrap();
    assert_eq!(c.upstreams[0].password.expose(), "s3cret-from-file");
    assert!(!c.to_redacted_toml().contains("s3cret-from-file"));
    let both = format!(
        "password = \"x\"\npassword_file = {:?}",
        f.display().to_string()
    );
    let e = load_str(&up(&both), &[]).unwrap_err().to_string();
    assert!(
        e.contains("upstreams[0]") && e.contains("password_file"),
        "{e}"
    );
    let e = load_str(&up("password_file = \"/nonexistent/pw\""), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("upstreams[0].password_file") && e.contains("/nonexistent/pw"),
        "{e}"
    );
}

#[test]
fn expand_handles_text_around_variables() {
    let look = |k: &str| (k == "A").then(|| "1".to_string());
    assert_eq!(expand("x${A}y", &look).unwrap(), "x1y");
    assert_eq!(expand("plain", &look).unwrap(), "plain");
    assert_eq!(expand("${B}", &look).unwrap_err(), "B");
}

/// The value of `key` (`section.name`, or `upstreams[].name` for the first upstream)
/// in `c`, as JSON (`null` for an unset option).
fn value_of(c: &Config, key: &str) -> serde_json::Value {
    let json = serde_json::to_value(c).unwrap();
    match key.strip_prefix("upstreams[].") {
        Some(k) => json["upstreams"][0][k].clone(),
        None => key.split('.').fold(json, |v, k| v[k].clone()),
    }
}

/// Adds every key under `prefix` of `v` to `out`: nested sections (`server.tls`) are
/// flattened to `server.tls.cert`; lists are values.
fn flatten(
    prefix: &str,
    v: &serde_json::Value,
    out: &mut std::collections::BTreeMap<String, serde_json::Value>,
) {
    match v.as_object() {
        // A map (`auth.groups`) with nothing in it by default is one key.
        Some(o) if !o.is_empty() => {
            for (k, value) in o {
                flatten(&format!("{prefix}.{k}"), value, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// Every key the code has, with its default: the sections of `Config::default()`, and
/// an `[[upstreams]]` entry with nothing but its required keys.
fn code_defaults() -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut out = std::collections::BTreeMap::new();
    let one = load_str(
        "[[upstreams]]\nname = \"example\"\nurl = \"https://example.com\"\n",
        &[],
    )
    .unwrap();
    let json = serde_json::to_value(Config::default()).unwrap();
    for (section, v) in json.as_object().unwrap() {
        if section != "upstreams" {
            flatten(section, v, &mut out);
        }
    }
    let up = serde_json::to_value(&one.upstreams[0]).unwrap();
    for (k, value) in up.as_object().unwrap() {
        out.insert(format!("upstreams[].{k}"), value.clone());
    }
    out
}

#[test]
fn the_embedded_file_states_exactly_the_defaults_in_code() {
    let embedded = Config::load_with_env(None, Vec::new()).unwrap();
    assert_eq!(
        serde_json::to_value(&embedded).unwrap(),
        serde_json::to_value(Config::default()).unwrap(),
        "config/pullcache.toml and Config::default() disagree"
    );
}

/// The README's configuration table: every row's key exists in the code with the
/// default the row states, and every key of the code has a row.
#[test]
fn the_readme_table_states_every_key_with_its_default() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("a Configuration section")
        .split("\n## ")
        .next()
        .unwrap();
    // key -> the default cell, as written
    let mut stated = std::collections::BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let keys: Vec<&str> = cells[0].split('`').skip(1).step_by(2).collect::<Vec<_>>();
        let first = keys[0];
        let prefix = &first[..first.rfind('.').map_or(0, |i| i + 1)];
        for k in &keys {
            let key = if k.contains('.') {
                k.to_string()
            } else {
                format!("{prefix}{k}")
            };
            stated.insert(key, cells[1].trim().to_string());
        }
    }
    let code = code_defaults();
    let stated_keys: Vec<&String> = stated.keys().collect();
    let code_keys: Vec<&String> = code.keys().collect();
    assert_eq!(
        stated_keys, code_keys,
        "README table keys vs keys in the code"
    );
    for (key, cell) in &stated {
        let literal = cell
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .filter(|c| !c.contains('`') && !code.contains_key(*c));
        let want = &code[key];
        match literal {
            // The README states a value: it must be what the code uses when the key
            // is left out (read through the code's own parser: "30d" is 30 days).
            Some(lit) => {
                let doc = match key.strip_prefix("upstreams[].") {
                    Some(k) => format!(
                        "[[upstreams]]\nname = \"example\"\nurl = \"https://example.com\"\n{k} = {lit}\n"
                    ),
                    None => {
                        let (section, k) = key.rsplit_once('.').unwrap();
                        format!("[{section}]\n{k} = {lit}\n")
                    }
                };
                let c = load_str(&doc, &[])
                    .unwrap_or_else(|e| panic!("README default of {key} ({lit}): {e}"));
                assert_eq!(&value_of(&c, key), want, "README default of {key}: {cell}");
            }
            // "required": leaving it out is an error.
            None if cell == "required" => {
                let k = key.strip_prefix("upstreams[].").unwrap();
                let doc = "[[upstreams]]\nname = \"example\"\nurl = \"https://example.com\"\n"
                    .lines()
                    .filter(|l| !l.starts_with(&format!("{k} =")))
                    .collect::<Vec<_>>()
                    .join("\n");
                let e = load_str(&doc, &[]).unwrap_err().to_string();
                assert!(e.contains(k), "leaving out {key}: {e}");
            }
            // Words ("none", "auto", "80% of ...", another key): the code has no value.
            None => assert!(want.is_null(), "{key}: README says {cell}, code has {want}"),
        }
    }
}

#[test]
fn sizes_patterns_and_urls_fail_naming_their_key() {
    for (doc, key) in [
        ("[storage]\nmax_size = -1\n", "storage.max_size"),
        ("[storage]\nmax_size = 1.5\n", "storage.max_size"),
        ("[storage]\nmax_size = \"12 parsecs\"\n", "storage.max_size"),
        ("[storage]\npin = [\"alpine\"]\n", "storage.pin"),
        (
            "[cache]\nimmutable_tags = [\"(\"]\n",
            "cache.immutable_tags",
        ),
        (
            "[[upstreams]]\nname = \"a\"\nurl = \"https://u:p@a\"\n",
            "upstreams[0].url",
        ),
    ] {
        let e = load_str(doc, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{doc}: {e}");
        assert!(!e.contains("untagged"), "{doc}: {e}");
    }
    let c = load_str("[storage]\nmax_size = \"1.5GiB\"\n", &[]).unwrap();
    assert_eq!(c.storage.max_size.unwrap().as_u64(), 3 << 29);
    let c = load_str("", &[("PULLCACHE_STORAGE__MAX_SIZE", "1048576")]).unwrap();
    assert_eq!(c.storage.max_size.unwrap().as_u64(), 1 << 20);
    // Blank is unset: the environment can clear a size the file sets.
    let c = load_str(
        "[storage]\nmax_size = \" 2GiB \"\n",
        &[("PULLCACHE_STORAGE__MAX_SIZE", "")],
    )
    .unwrap();
    assert_eq!(c.storage.max_size, None);
    let c = load_str("[storage]\nmax_size = \" 2GiB \"\n", &[]).unwrap();
    assert_eq!(c.storage.max_size.unwrap().as_u64(), 2 << 30);
}

#[test]
fn upstream_tls_files_fail_naming_their_key() {
    let up = |extra: &str| {
        format!("[[upstreams]]\nname = \"r.example\"\nurl = \"https://r.example\"\n{extra}\n")
    };
    let e = load_str(&up("ca = \"/nonexistent/ca.crt\""), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("upstreams[0].ca") && e.contains("/nonexistent/ca.crt"),
        "{e}"
    );
    let e = load_str(&up("client_cert = \"/nonexistent/c.crt\""), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("upstreams[0].client_key"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let e = load_str(&up(&format!("ca = {:?}", junk.display().to_string())), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("upstreams[0].ca") && e.contains("no PEM certificate"),
        "{e}"
    );
}
