//! MMLU as lm-evaluation-harness renders and scores it; prefix reuse changes no score and runs fewer tokens.

mod common;

use billion::bench::mmlu::{self, BatchSize, Question, Subject};
use billion::load::{load, LoadOptions};
use candle_core::D;
use std::sync::atomic::AtomicBool;

static NOT_INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[test]
fn prompt_is_byte_identical_to_the_harness() {
    let Some(dir) = common::shared("data/mmlu") else { return };
    let subjects = mmlu::load_dir(&dir, Some(&["abstract_algebra".to_string()])).unwrap();
    assert_eq!(subjects.len(), 1);
    let want = std::fs::read_to_string(dir.join("mmlu_prompt_example_abstract_algebra_5shot.txt")).unwrap();
    assert_eq!(mmlu::prompt(&subjects[0], 5, &subjects[0].test[0]), want);
    let all = mmlu::load_dir(&dir, None).unwrap();
    assert_eq!(all.len(), 57);
    assert_eq!(all.iter().map(|s| s.test.len()).sum::<usize>(), 14_042);
    let groups = mmlu::subject_groups();
    assert!(all.iter().all(|s| groups.contains_key(&s.name)), "every subject has an lm-eval group");
    let e = mmlu::load_dir(&dir, Some(&["astrology".to_string()])).unwrap_err().to_string();
    assert!(e.contains("astrology"), "{e}");
}

fn q(text: &str, answer: usize) -> Question {
    Question { question: text.into(), choices: ["the".into(), "a".into(), "he".into(), "at".into()], answer }
}

#[test]
fn scores_equal_a_hand_computed_log_softmax() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let cfg = billion::testing::tiny_config(billion::model::config::Architecture::Llama, 320);
    billion::testing::write_llama_gguf(&path, &cfg, 2, candle_core::quantized::GgmlDType::F32).unwrap();
    let loaded = load(path.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let subject = Subject {
        name: "tiny_things".into(),
        dev: vec![q("what is the?", 0), q("then?", 2)],
        test: vec![q("and this one?", 1), q("or that?", 3), q("last?", 0)],
    };
    let groups = mmlu::subject_groups();
    let one = |batch| {
        mmlu::evaluate(
            &loaded,
            std::slice::from_ref(&subject),
            2,
            Some(2),
            &groups,
            true,
            batch,
            &NOT_INTERRUPTED,
            |_| {},
        )
        .unwrap()
    };
    let run = one(BatchSize::Rows(1));
    // This tokenizer spells " A" with more than one token after these contexts: the batched path scores such
    // questions alone, as the harness does, and must still agree.
    let batched = one(BatchSize::Auto);
    let details = run.details;
    assert_eq!(run.results[0].questions, 2, "--limit");
    assert!(!run.interrupted);
    // By hand: full forward of context + " X", log-softmax at the position before the continuation.
    let tok = loaded.tokenizer().unwrap();
    for (qi, question) in subject.test[..2].iter().enumerate() {
        let context = mmlu::prompt(&subject, 2, question);
        assert!(
            context.starts_with("The following are multiple choice questions (with answers) about tiny things.\n\n")
        );
        for (ci, letter) in mmlu::LETTERS.iter().enumerate() {
            let ctx = tok.encode(&context, false).unwrap();
            let whole = tok.encode(&format!("{context} {letter}"), false).unwrap();
            let m = &loaded.model;
            let mut cache = m.new_cache();
            let logits = m.forward(&m.input(&whole).unwrap(), &mut cache).unwrap().squeeze(0).unwrap();
            let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            let mut want = 0f64;
            for (pos, &t) in whole.iter().enumerate().skip(ctx.len()) {
                want += lsm.get(pos - 1).unwrap().get(t as usize).unwrap().to_scalar::<f32>().unwrap() as f64;
            }
            let got = details[0].1[qi].loglik[ci];
            assert!((got - want).abs() < 1e-4, "q{qi} {letter}: {got} vs {want}");
            let got = batched.details[0].1[qi].loglik[ci];
            assert!((got - want).abs() < 1e-4, "batched q{qi} {letter}: {got} vs {want}");
        }
    }
    // Prefix reuse changes no score, and it happened: fewer tokens were run through the model.
    let eval = |reuse| {
        let batch = BatchSize::Rows(1);
        mmlu::evaluate(
            &loaded,
            std::slice::from_ref(&subject),
            2,
            None,
            &groups,
            reuse,
            batch,
            &NOT_INTERRUPTED,
            |_| {},
        )
        .unwrap()
    };
    let (fresh, reused) = (eval(false), eval(true));
    let prefix = loaded.tokenizer().unwrap().encode(&mmlu::fewshot_prefix(&subject, 2), false).unwrap().len();
    assert!(
        reused.tokens_run + 2 * (prefix - 1) <= fresh.tokens_run,
        "the prefix ({prefix} tokens) is run once, not for each of 3 questions: {} vs {}",
        reused.tokens_run,
        fresh.tokens_run
    );
    for (a, b) in fresh.details[0].1.iter().zip(&reused.details[0].1) {
        for c in 0..4 {
            assert!((a.loglik[c] - b.loglik[c]).abs() < 1e-4);
        }
        assert_eq!(a.predicted, b.predicted);
    }
}

#[test]
fn the_results_show_prefix_reuse_saved_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    let cfg = billion::testing::tiny_config(billion::model::config::Architecture::Llama, 320);
    billion::testing::write_llama_gguf(&model, &cfg, 2, candle_core::quantized::GgmlDType::Q8_0).unwrap();
    let mmlu = dir.path().join("mmlu");
    std::fs::create_dir_all(mmlu.join("dev")).unwrap();
    std::fs::create_dir_all(mmlu.join("test")).unwrap();
    let rows = |n: usize| -> String { (0..n).map(|i| format!("\"q{i}: which?\",one,two,three,four,B\n")).collect() };
    std::fs::write(mmlu.join("dev/virology_dev.csv"), rows(5)).unwrap();
    std::fs::write(mmlu.join("test/virology_test.csv"), rows(6)).unwrap();
    let run = |extra: &[&str]| -> serde_json::Value {
        let res = dir.path().join(format!("results{}", extra.len()));
        let mut args =
            vec!["bench", "--models", model.to_str().unwrap(), "--mmlu", "--mmlu-dir", mmlu.to_str().unwrap()];
        args.extend_from_slice(&["--results-dir", res.to_str().unwrap(), "--device", "cpu", "--json"]);
        args.extend_from_slice(extra);
        let out = common::billion(&args);
        assert!(out.status.success(), "{}", common::stderr(&out));
        let doc: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
        doc["models"][0]["mmlu"].clone()
    };
    let (reused, fresh) = (run(&[]), run(&["--no-prefix-reuse"]));
    assert_eq!((reused["prefix_reuse"].as_bool(), fresh["prefix_reuse"].as_bool()), (Some(true), Some(false)));
    let (r, f) = (reused["tokens_run"].as_u64().unwrap(), fresh["tokens_run"].as_u64().unwrap());
    assert!(r > 0 && r * 2 < f, "with reuse {r} tokens, without {f}");
    assert_eq!(reused["predictions"], fresh["predictions"]);
}

/// The batched path on a real model (SmolLM2-135M Q4_1, f32 on the CPU) over a few real subjects: the same
/// predicted letter on every question as one question at a time, every choice's log-likelihood within 1e-4.
#[test]
fn batched_scores_equal_one_question_at_a_time_on_a_real_model() {
    let Some(dir) = common::shared("data/mmlu") else { return };
    let Some(model) = common::smollm2() else { return };
    let names: Vec<String> = ["abstract_algebra", "high_school_geography"].iter().map(|s| s.to_string()).collect();
    let subjects = mmlu::load_dir(&dir, Some(&names)).unwrap();
    let loaded =
        load(model.to_str().unwrap(), &LoadOptions { device: Some("cpu".parse().unwrap()), ..Default::default() })
            .unwrap();
    let groups = mmlu::subject_groups();
    let run = |batch| {
        mmlu::evaluate(&loaded, &subjects, 5, Some(10), &groups, true, batch, &NOT_INTERRUPTED, |_| {}).unwrap()
    };
    let (alone, batched) = (run(BatchSize::Rows(1)), run(BatchSize::Rows(8)));
    assert_eq!(batched.batch_rows, 8);
    assert_eq!(alone.details.len(), 2);
    for ((subject, a), (_, b)) in alone.details.iter().zip(&batched.details) {
        assert_eq!(a.len(), 10, "{subject}");
        for (i, (qa, qb)) in a.iter().zip(b).enumerate() {
            assert_eq!(qa.predicted, qb.predicted, "{subject} question {i}");
            for c in 0..4 {
                let d = (qa.loglik[c] - qb.loglik[c]).abs();
                assert!(d < 1e-4, "{subject} question {i} choice {c}: {} vs {}", qa.loglik[c], qb.loglik[c]);
            }
        }
    }
}
