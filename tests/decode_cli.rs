//! `iomt-edge decode`, run as a user would: a payload on standard input, canonical readings as
//! JSON lines on standard output, exit status 2 and the reason on standard error for an invalid
//! payload.

mod common;

use std::process::{Command, Output};

use common::output_with_stdin;
use serde_json::Value;

fn decode(args: &[&str], input: &[u8]) -> Output {
    output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("decode")
            .args(args),
        input,
    )
}

fn json_lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn prints_canonical_readings() {
    // The Temperature Measurement vector of tests/vectors/ble-gatt.json, as hex.
    let out = decode(
        &["--codec", "ble-2a1c", "--hex"],
        b"06B00E00FEDC070C050B321B04\n",
    );
    let r = json_lines(&out);
    assert_eq!(r.len(), 2);
    // A 2012 device time decoded today lies outside the default clock window.
    assert_eq!(
        r[0],
        serde_json::json!({"ts":"2012-12-05T11:50:27Z","source":"stdin","subject":null,
            "metric":"body_temp","value":37.6,"unit":"Cel","flags":["clock_suspect"]})
    );
    assert_eq!(r[1]["metric"], "temp_site");
    assert_eq!(r[1]["text"], "finger");
    // Binary payloads as base64; SenML JSON as it is.
    let r = json_lines(&decode(&["--codec", "ble-2a37", "--base64"], b"AFU="));
    assert_eq!(r[0]["value"], 85.0);
    let r = json_lines(&decode(
        &["--codec", "senml-json", "--topic", "sensors/t-1"],
        br#"[{"bn":"urn:dev:ow:10e2073a01080063:","n":"body_temp","u":"Cel","v":23.1}]"#,
    ));
    assert_eq!(r[0]["source"], "sensors/t-1");
    assert_eq!(
        r[0]["flags"],
        serde_json::json!(["out_of_range", "time_from_receipt"])
    );
}

#[test]
fn takes_a_route_of_a_pipeline_file_with_its_options() {
    let out = decode(
        &[
            "--codec",
            "csv",
            "--pipeline",
            "pipelines/formats.toml",
            "--route",
            "10",
            "--topic",
            "csv/serial-9",
        ],
        b"2024-03-01T10:00:00Z,bed-4,72,97,98.6,V\n",
    );
    let r = json_lines(&out);
    assert_eq!(r.len(), 4);
    assert_eq!(r[0]["source"], "serial-9");
    assert_eq!(r[0]["subject"], "bed-4");
    assert!((r[2]["value"].as_f64().unwrap() - 37.0).abs() < 1e-9);
    assert_eq!(r[3]["text"], "V");
}

#[test]
fn an_invalid_payload_exits_2_with_the_reason() {
    let out = decode(
        &["--codec", "ble-2a1c", "--hex"],
        b"06B00E00FEDC070C050B321B",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("truncated") && err.contains("temperature type"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    let out = decode(
        &["--codec", "fhir"],
        br#"{"resourceType":"Observation","status":"entered-in-error"}"#,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("status"));
    let out = decode(&["--codec", "ble-2a37", "--hex"], b"0G");
    assert_eq!(out.status.code(), Some(2));
    // Above the pipeline's ingest.max_payload_bytes: refused before decoding.
    let big = vec![b' '; 70_000];
    let out = decode(
        &[
            "--codec",
            "json",
            "--pipeline",
            "pipelines/formats.toml",
            "--route",
            "11",
            "--topic",
            "json/wearable-1",
        ],
        &big,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("oversized"));
}

#[test]
fn usage_errors_are_not_payload_errors() {
    for (args, says) in [
        (&["--codec", "json"][..], "needs a [route.json] mapping"),
        (
            &[
                "--codec",
                "fhir",
                "--pipeline",
                "pipelines/formats.toml",
                "--route",
                "10",
            ][..],
            "uses codec `csv`",
        ),
        (
            &[
                "--codec",
                "csv",
                "--pipeline",
                "pipelines/formats.toml",
                "--route",
                "99",
            ][..],
            "--route takes 0 to 11",
        ),
        (
            &[
                "--codec",
                "csv",
                "--pipeline",
                "pipelines/formats.toml",
                "--route",
                "10",
                "--topic",
                "x/y",
            ][..],
            "does not match",
        ),
    ] {
        let out = decode(args, b"");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn a_route_whose_templates_read_the_topic_needs_a_topic() {
    // Route 10 of formats.toml: topic "csv/+", source "{2}".
    let out = decode(
        &[
            "--codec",
            "csv",
            "--pipeline",
            "pipelines/formats.toml",
            "--route",
            "10",
        ],
        b"2024-03-01T10:00:00Z,bed-4,72,97,98.6,V\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: route[10] of pipelines/formats.toml takes its source from the topic (`{2}`): \
         pass --topic with a topic that matches `csv/+`\n"
    );

    // A route whose source and subject are fixed decodes without one.
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        "[[route]]\ntopic = \"serial/+\"\ncodec = \"csv\"\nsource = \"monitor-1\"\n\
         subject = \"bed-4\"\n[route.csv]\ncolumns = [\"hr\"]\n\
         [route.csv.readings]\nhr = { metric = \"heart_rate\" }\n",
    )
    .unwrap();
    let r = json_lines(&decode(
        &[
            "--codec",
            "csv",
            "--pipeline",
            pipeline.to_str().unwrap(),
            "--route",
            "0",
        ],
        b"72\n",
    ));
    assert_eq!(r.len(), 1);
    assert_eq!(
        (&r[0]["source"], &r[0]["subject"]),
        (&"monitor-1".into(), &"bed-4".into())
    );
    assert_eq!(r[0]["value"], 72.0);
}

#[test]
fn a_codec_that_needs_options_says_where_they_come_from() {
    let out = decode(&["--codec", "csv"], b"72\n");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: codec `csv` needs [route.csv] naming the columns: pass --pipeline FILE --route N\n"
    );
}

#[test]
fn device_clocks_are_judged_by_the_pipelines_window() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = |ingest: &str| {
        let path = dir.path().join(format!("p{}.toml", ingest.len()));
        std::fs::write(
            &path,
            format!("[ingest]\n{ingest}\n[[route]]\ntopic = \"ble/+/2a1c\"\ncodec = \"ble-2a1c\"\nsource = \"thermometer\"\n"),
        )
        .unwrap();
        path
    };
    let flags = |path: &std::path::Path| {
        let out = decode(
            &[
                "--codec",
                "ble-2a1c",
                "--hex",
                "--pipeline",
                path.to_str().unwrap(),
                "--route",
                "0",
            ],
            b"06B00E00FEDC070C050B321B04",
        );
        json_lines(&out)[0]["flags"].clone()
    };
    // The vector's thermometer clock reads 2012.
    assert_eq!(flags(&pipeline("")), serde_json::json!(["clock_suspect"]));
    assert_eq!(
        flags(&pipeline("clock_max_past = \"100years\"")),
        serde_json::json!([])
    );
}
