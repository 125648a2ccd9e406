//! MMLU as lm-evaluation-harness renders and scores it.

mod common;

use billion::bench::mmlu::{self, Question, Subject};
use billion::load::{load, LoadOptions};
use candle_core::D;

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
    let (res, details) =
        mmlu::evaluate(&loaded, std::slice::from_ref(&subject), 2, Some(2), &groups, true, |_| {}).unwrap();
    assert_eq!(res[0].questions, 2, "--limit");
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
        }
    }
    // Prefix reuse changes nothing.
    let (_, fresh) = mmlu::evaluate(&loaded, std::slice::from_ref(&subject), 2, None, &groups, false, |_| {}).unwrap();
    let (_, reused) = mmlu::evaluate(&loaded, std::slice::from_ref(&subject), 2, None, &groups, true, |_| {}).unwrap();
    for (a, b) in fresh[0].1.iter().zip(&reused[0].1) {
        for c in 0..4 {
            assert!((a.loglik[c] - b.loglik[c]).abs() < 1e-4);
        }
        assert_eq!(a.predicted, b.predicted);
    }
}
