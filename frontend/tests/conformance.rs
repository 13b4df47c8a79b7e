//! BuildKit conformance: the parser's golden files, negative cases and line
//! numbers, the shell lexer's vector files, and every case of `cases/*.json`
//! (see `SOURCE.md` in the conformance folder for what each check means).
//!
//! The data lives in `shared/conformance/` beside the repository. Without
//! it every test prints why it skipped and passes. No entry is skipped when
//! the data is there: BuildKit skips none of them on Linux (only the `W`
//! lines of `envVarTest`, which upstream runs on Windows only).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use kiln_frontend::parser::{self, Arg, DirectiveParser, JsonError};
use kiln_frontend::shell::{self, EnvList, Lex};
use serde_json::Value;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/conformance");

fn data_dir() -> Option<PathBuf> {
    let p = PathBuf::from(DATA);
    if p.join("SOURCE.md").is_file() {
        Some(p)
    } else {
        println!("skipped: conformance data not found at {DATA} because shared/ is not beside the repo");
        None
    }
}

fn report(what: &str, ok: usize, total: usize, failures: &[String]) {
    println!("{what}: {ok}/{total}");
    eprintln!("{what}: {ok}/{total}");
    for f in failures {
        eprintln!("  FAIL {f}");
    }
    assert!(total > 0, "{what}: no cases found");
    assert_eq!(ok, total, "{what}: {} failures", failures.len());
}

fn cases(dir: &Path, file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("cases").join(file)).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["skipped"].as_array().unwrap().is_empty(), "{file}: upstream skips nothing");
    v["cases"].as_array().unwrap().clone()
}

fn subdirs(dir: PathBuf) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

/// `parser/testfiles`: dump + LF equals `result`. Returns (ok, total, failures).
fn run_testfiles(dir: &Path) -> (usize, usize, Vec<String>) {
    let mut ok = 0;
    let mut fails = Vec::new();
    let dirs = subdirs(dir.join("parser/testfiles"));
    for d in &dirs {
        let src = std::fs::read(d.join("Dockerfile")).unwrap();
        let want = std::fs::read_to_string(d.join("result")).unwrap();
        match parser::parse(&src) {
            Ok(r) if r.ast.dump() + "\n" == want => ok += 1,
            Ok(r) => fails.push(format!("{}: dump differs:\n{}\nwant:\n{}", d.display(), r.ast.dump(), want)),
            Err(e) => fails.push(format!("{}: {e}", d.display())),
        }
    }
    (ok, dirs.len(), fails)
}

fn run_negative(dir: &Path) -> (usize, usize, Vec<String>) {
    let mut ok = 0;
    let mut fails = Vec::new();
    let dirs = subdirs(dir.join("parser/testfiles-negative"));
    for d in &dirs {
        let src = std::fs::read(d.join("Dockerfile")).unwrap();
        match parser::parse(&src) {
            Err(_) => ok += 1,
            Ok(r) => fails.push(format!("{}: parsed: {}", d.display(), r.ast.dump())),
        }
    }
    (ok, dirs.len(), fails)
}

#[test]
fn parser_testfiles() {
    let Some(dir) = data_dir() else { return };
    let (ok, total, fails) = run_testfiles(&dir);
    report("parser testfiles", ok, total, &fails);
}

#[test]
fn parser_testfiles_negative() {
    let Some(dir) = data_dir() else { return };
    let (ok, total, fails) = run_negative(&dir);
    report("parser testfiles-negative", ok, total, &fails);
}

fn check_line_numbers(input: &str, expect: &Value) -> Result<(), String> {
    let r = parser::parse(input.as_bytes()).map_err(|e| e.to_string())?;
    let root = &r.ast;
    let want = |k: &str| expect[k].as_u64().unwrap() as usize;
    if root.span.start_line != want("root_start_line") || root.span.end_line != want("root_end_line") {
        return Err(format!("root span {:?}", root.span));
    }
    if root.children.len() != want("children_count") {
        return Err(format!("{} children", root.children.len()));
    }
    for (c, l) in root.children.iter().zip(expect["children_lines"].as_array().unwrap()) {
        let (s, e) = (l[0].as_u64().unwrap() as usize, l[1].as_u64().unwrap() as usize);
        if (c.span.start_line, c.span.end_line) != (s, e) {
            return Err(format!("child {:?} want {s}..{e}", c.span));
        }
    }
    Ok(())
}

#[test]
fn parser_testfile_line() {
    let Some(dir) = data_dir() else { return };
    let input = std::fs::read_to_string(dir.join("parser/testfile-line/Dockerfile")).unwrap();
    let expect = cases(&dir, "parser_misc.json")
        .into_iter()
        .find(|c| c["test"] == "TestParseIncludesLineNumbers")
        .unwrap()["expect"]
        .clone();
    let r = check_line_numbers(&input, &expect);
    report("parser testfile-line", usize::from(r.is_ok()), 1, &r.err().into_iter().collect::<Vec<_>>());
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn escape_of(c: &Value) -> char {
    str_of(&c["escape"]).chars().next().unwrap_or('\\')
}

fn check_parser_misc(dir: &Path, c: &Value) -> Result<(), String> {
    let e = &c["expect"];
    match str_of(&c["test"]) {
        "TestParseCases" => {
            let (ok, total, f) = run_testfiles(dir);
            if ok == total { Ok(()) } else { Err(f.join("; ")) }
        }
        "TestParseErrorCases" => {
            let (ok, total, f) = run_negative(dir);
            if ok == total { Ok(()) } else { Err(f.join("; ")) }
        }
        "TestParseWords" => {
            let got = parser::parse_words(str_of(&c["input"]), escape_of(c));
            let want: Vec<&str> = e["words"].as_array().unwrap().iter().map(str_of).collect();
            if got == want { Ok(()) } else { Err(format!("{got:?}")) }
        }
        "TestParseIncludesLineNumbers" => check_line_numbers(str_of(&c["input"]), e),
        "TestParseWarnsOnEmptyContinutationLine" => {
            let r = parser::parse(str_of(&c["input"]).as_bytes()).map_err(|e| e.to_string())?;
            if r.warnings.len() != e["warnings_count"].as_u64().unwrap() as usize {
                return Err(format!("{} warnings", r.warnings.len()));
            }
            for w in e["warnings"].as_array().unwrap() {
                let got = &r.warnings[w["index"].as_u64().unwrap() as usize];
                for s in w["short_contains"].as_array().into_iter().flatten() {
                    if !got.short.contains(str_of(s)) {
                        return Err(format!("{:?} lacks {s}", got.short));
                    }
                }
                for s in w["detail0_contains"].as_array().into_iter().flatten() {
                    if !got.detail[0].contains(str_of(s)) {
                        return Err(format!("{:?} lacks {s}", got.detail));
                    }
                }
            }
            Ok(())
        }
        "TestParseReturnsScannerErrors" => {
            let var = &c["template_vars"]["LABEL"];
            let label = str_of(&var["repeat"]).repeat(var["count"].as_u64().unwrap() as usize);
            let input = str_of(&c["input_template"]).replace("{LABEL}", &label);
            match parser::parse(input.as_bytes()) {
                Err(err) if err.message == str_of(&e["error_message"]) => Ok(()),
                Err(err) => Err(format!("wrong message {:?}", err.message)),
                Ok(_) => Err("parsed".into()),
            }
        }
        t => Err(format!("unknown test {t}")),
    }
}

#[test]
fn cases_parser_misc() {
    let Some(dir) = data_dir() else { return };
    run_cases(&dir, "parser_misc.json", |c| check_parser_misc(&dir, c));
}

fn run_cases(dir: &Path, file: &str, check: impl Fn(&Value) -> Result<(), String>) {
    let all = cases(dir, file);
    let mut fails = Vec::new();
    for (i, c) in all.iter().enumerate() {
        if let Err(e) = check(c) {
            fails.push(format!("#{i} {} {}: {e}", str_of(&c["test"]), str_of(&c["input"]).escape_debug()));
        }
    }
    report(&format!("cases/{file}"), all.len() - fails.len(), all.len(), &fails);
}

fn values(nodes: &[Arg]) -> Vec<&str> {
    nodes.iter().map(|n| n.value.as_str()).collect()
}

#[test]
fn cases_json_forms() {
    let Some(dir) = data_dir() else { return };
    run_cases(&dir, "json_forms.json", |c| {
        let e = &c["expect"];
        let r = parser::parse_json(str_of(&c["input"]));
        match (str_of(&c["name"]), r) {
            ("valid", Ok(nodes)) => {
                let want: Vec<&str> = e["values"].as_array().unwrap().iter().map(str_of).collect();
                if values(&nodes) == want { Ok(()) } else { Err(format!("{:?}", values(&nodes))) }
            }
            ("invalid", Err(JsonError::NotStringArray)) => Ok(()),
            (_, r) => Err(format!("{r:?}")),
        }
    });
}

#[test]
fn cases_line_parsers() {
    let Some(dir) = data_dir() else { return };
    run_cases(&dir, "line_parsers.json", |c| {
        let e = &c["expect"];
        let r = parser::parse_name_val(str_of(&c["input"]), str_of(&c["key"]), escape_of(c));
        match r {
            Ok(_) if e["error"] == true => Err("succeeded".into()),
            Err(_) if e["error"] == true => Ok(()),
            Err(m) => Err(m),
            Ok(nodes) => {
                let want: Vec<&str> = e["next_chain"].as_array().unwrap().iter().map(str_of).collect();
                // An `Arg` holds only a value and nested instructions, so
                // "nothing else set" is: no nested instruction.
                let clean = nodes.iter().all(|n| n.children.is_empty());
                if values(&nodes) == want && clean { Ok(()) } else { Err(format!("{nodes:?}")) }
            }
        }
    });
}

#[test]
fn cases_directives() {
    let Some(dir) = data_dir() else { return };
    run_cases(&dir, "directives.json", |c| {
        let e = &c["expect"];
        let input = str_of(&c["input"]);
        match str_of(&c["func"]) {
            "DirectiveParser.ParseAll" => {
                let got = DirectiveParser::default().parse_all(input).map_err(|e| e.to_string())?;
                let got: Vec<(String, String)> = got.into_iter().map(|d| (d.name, d.value)).collect();
                let want: Vec<(String, String)> = e["directives"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| (str_of(&d["name"]).to_string(), str_of(&d["value"]).to_string()))
                    .collect();
                if got == want { Ok(()) } else { Err(format!("{got:?}")) }
            }
            f @ ("DetectSyntax" | "ParseDirective") => {
                let got = if f == "DetectSyntax" {
                    parser::detect_syntax(input)
                } else {
                    parser::parse_directive(str_of(&c["directive"]), input)
                };
                if got.is_some() != (e["ok"] == true) {
                    return Err(format!("ok mismatch: {got:?}"));
                }
                let (r, cmd, line) = got.map(|d| (d.reference, d.cmdline, d.line)).unwrap_or_default();
                if let Some(w) = e["ref"].as_str()
                    && r != w
                {
                    return Err(format!("ref {r:?}"));
                }
                if let Some(w) = e["cmdline"].as_str()
                    && cmd != w
                {
                    return Err(format!("cmdline {cmd:?}"));
                }
                for k in ["location_start_line", "location_end_line"] {
                    if let Some(w) = e[k].as_u64()
                        && line as u64 != w
                    {
                        return Err(format!("line {line}"));
                    }
                }
                Ok(())
            }
            f => Err(format!("unknown func {f}")),
        }
    });
}

#[test]
fn cases_heredoc() {
    let Some(dir) = data_dir() else { return };
    run_cases(&dir, "heredoc.json", |c| {
        let e = &c["expect"];
        let input = str_of(&c["input"]);
        match str_of(&c["func"]) {
            "Parse" => {
                let r = parser::parse(input.as_bytes()).map_err(|e| e.to_string())?;
                for ch in e["children"].as_array().unwrap() {
                    let node = &r.ast.children[ch["index"].as_u64().unwrap() as usize];
                    let want = ch["heredocs"].as_array().cloned().unwrap_or_default();
                    if node.heredocs.len() != want.len() {
                        return Err(format!("child {}: {:?}", ch["index"], node.heredocs));
                    }
                    for (h, w) in node.heredocs.iter().zip(&want) {
                        let same = h.name == str_of(&w["name"])
                            && h.content == str_of(&w["content"])
                            && h.expand == (w["expand"] == true)
                            && h.chomp == (w["chomp"] == true)
                            && Some(h.file_descriptor) == w["file_descriptor"].as_u64();
                        if !same {
                            return Err(format!("child {}: {h:?}", ch["index"]));
                        }
                    }
                }
                Ok(())
            }
            "ChompHeredocContent" => {
                let got = parser::chomp_heredoc_content(input);
                if got == str_of(&e["result"]) { Ok(()) } else { Err(got) }
            }
            "ParseHeredoc" => match (str_of(&c["name"]), parser::parse_heredoc(input)) {
                ("not_heredoc", Ok(None)) => Ok(()),
                ("valid", Ok(Some(h))) if h.name == str_of(&e["heredoc_name"]) => Ok(()),
                ("invalid", Err(_)) => Ok(()),
                (_, r) => Err(format!("{r:?}")),
            },
            "heredocsFromLine" => {
                let got = parser::heredocs_from_line(input)?;
                let names: Vec<&str> = got.iter().map(|h| h.name.as_str()).collect();
                let want: Vec<&str> = e["heredoc_names"].as_array().unwrap().iter().map(str_of).collect();
                if names == want { Ok(()) } else { Err(format!("{names:?}")) }
            }
            f => Err(format!("unknown func {f}")),
        }
    });
}

/// `shell/envVarTest`: returns (ok, total, failures) over the Linux lines.
fn run_env_var_test(dir: &Path, env: &EnvList) -> (usize, usize, Vec<String>) {
    let text = std::fs::read_to_string(dir.join("shell/envVarTest")).unwrap();
    let lex = Lex::new('\\');
    let (mut ok, mut total, mut fails) = (0, 0, Vec::new());
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(f.len(), 3, "bad line {line:?}");
        match f[0] {
            "A" | "U" => {}
            "W" => continue, // Windows-only vector (case-insensitive names).
            p => panic!("bad platform {p}"),
        }
        total += 1;
        let got = lex.process_word(f[1], env);
        let good = match &got {
            Ok((s, _)) => f[2] != "error" && s == f[2],
            Err(_) => f[2] == "error",
        };
        if good {
            ok += 1;
        } else {
            fails.push(format!("{line}: got {got:?}"));
        }
    }
    (ok, total, fails)
}

fn run_words_test(dir: &Path) -> (usize, usize, Vec<String>) {
    let text = std::fs::read_to_string(dir.join("shell/wordsTest")).unwrap();
    let lex = Lex::new('\\');
    let mut env: Vec<String> = Vec::new();
    let (mut ok, mut total, mut fails) = (0, 0, Vec::new());
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ENV ") {
            env.push(rest.trim_start_matches(' ').to_string());
            continue;
        }
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f.len(), 2, "bad line {line:?}");
        total += 1;
        let want: Vec<&str> = f[1].trim_start_matches(' ').split(',').collect();
        let got = lex.process_words(f[0].trim(), &EnvList::from_slice(&env)).unwrap_or_else(|_| vec!["error".into()]);
        if got == want {
            ok += 1;
        } else {
            fails.push(format!("{line}: got {got:?}"));
        }
    }
    (ok, total, fails)
}

fn env_of(c: &Value) -> EnvList {
    let list: Vec<&str> = c["env"].as_array().map(|a| a.iter().map(str_of).collect()).unwrap_or_default();
    EnvList::from_slice(&list)
}

#[test]
fn shell_env_var_test() {
    let Some(dir) = data_dir() else { return };
    let env = EnvList::from_slice(&["PWD=/home", "SHELL=bash", "KOREAN=한국어", "NULL="]);
    let (ok, total, fails) = run_env_var_test(&dir, &env);
    report("shell envVarTest (A+U lines)", ok, total, &fails);
    println!("shell envVarTest: W lines skipped: BuildKit runs them on Windows only (case-insensitive variable names)");
}

#[test]
fn shell_words_test() {
    let Some(dir) = data_dir() else { return };
    let (ok, total, fails) = run_words_test(&dir);
    report("shell wordsTest", ok, total, &fails);
}

fn set_of(v: &Value) -> BTreeSet<String> {
    v.as_array().unwrap().iter().map(|s| str_of(s).to_string()).collect()
}

#[test]
fn cases_lex() {
    let Some(dir) = data_dir() else { return };
    run_cases(&dir, "lex.json", |c| {
        let e = &c["expect"];
        let input = str_of(&c["input"]);
        match str_of(&c["func"]) {
            "convertShellPatternToRegex" => {
                let o = &c["options"];
                let got = shell::convert_shell_pattern_to_regex(input, o["greedy"] == true, o["anchored"] == true);
                match got {
                    Ok(r) if e["error"] != true && r == str_of(&e["regex"]) && regex::Regex::new(&r).is_ok() => Ok(()),
                    Err(_) if e["error"] == true => Ok(()),
                    r => Err(format!("{r:?}")),
                }
            }
            "reverseString" => {
                let got = shell::reverse_string(input);
                if got == str_of(&e["result"]) { Ok(()) } else { Err(got) }
            }
            "reversePattern" => {
                let got = shell::reverse_pattern(input);
                if got == str_of(&e["result"]) { Ok(()) } else { Err(got) }
            }
            "ProcessWord" if c.get("corpus").is_some() => {
                let (ok, total, f) = run_env_var_test(&dir, &env_of(c));
                if ok == total { Ok(()) } else { Err(f.join("; ")) }
            }
            "ProcessWords" => {
                let (ok, total, f) = run_words_test(&dir);
                if ok == total { Ok(()) } else { Err(f.join("; ")) }
            }
            "ProcessWord" => {
                let mut lex = Lex::new(escape_of(c));
                lex.raw_quotes = false;
                match lex.process_word(input, &env_of(c)) {
                    Ok((s, _)) if e["error"] != true && s == str_of(&e["result"]) => Ok(()),
                    Err(err) if e["error"] == true && err.0.contains(str_of(&e["error_contains"])) => Ok(()),
                    r => Err(format!("{r:?}")),
                }
            }
            "shellWord.getEnv" => {
                let env = env_of(c);
                for (k, v) in e["values"].as_object().unwrap() {
                    let got = shell::EnvGetter::get(&env, k).unwrap_or("");
                    if got != str_of(v) {
                        return Err(format!("{k}={got}"));
                    }
                }
                Ok(())
            }
            "ProcessWordWithMatches" => {
                let env: HashMap<String, String> = c["env_map"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), str_of(v).to_string()))
                    .collect();
                let r = Lex::new(escape_of(c)).process_word_with_matches(input, &env);
                match r {
                    Err(_) if e["error"] == true => Ok(()),
                    Ok(r) if e["error"] != true => {
                        if r.result != str_of(&e["result"]) {
                            return Err(format!("result {:?}", r.result));
                        }
                        if e.get("matched").is_some() && r.matched != set_of(&e["matched"]) {
                            return Err(format!("matched {:?}", r.matched));
                        }
                        if e.get("unmatched").is_some() && r.unmatched != set_of(&e["unmatched"]) {
                            return Err(format!("unmatched {:?}", r.unmatched));
                        }
                        Ok(())
                    }
                    r => Err(format!("{r:?}")),
                }
            }
            f => Err(format!("unknown func {f}")),
        }
    });
}
