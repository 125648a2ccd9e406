//! Speculative decoding: greedy output equals the target's, the sampled distribution equals the target's
//! (chi-square over 20,000 seeded runs; a broken acceptance rule fails it), rollback leaves both caches on the
//! accepted prefix, and incompatible tokenizers are refused.

mod common;

use billion::generation::{generate, sampling::probabilities, sampling::SamplingParams, GenerateParams};
use billion::load::{load, LoadOptions, LoadedModel};
use billion::model::config::Architecture;
use billion::model::Model;
use billion::speculative::{check_compatible, AcceptRule, SpecParams, SpeculativeDecoder};
use billion::testing::{tiny_config, write_hf_model};

fn cpu() -> LoadOptions {
    LoadOptions {
        device: Some(billion::load::DeviceSpec::Cpu),
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    }
}

fn tiny(arch: Architecture, vocab: usize, seed: u64) -> (tempfile::TempDir, LoadedModel) {
    let d = tempfile::tempdir().unwrap();
    write_hf_model(d.path(), &tiny_config(arch, vocab), seed).unwrap();
    let m = load(d.path().to_str().unwrap(), &cpu()).unwrap();
    (d, m)
}

fn greedy(target: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = target.new_cache();
    generate(target, None, prompt, &mut cache, &GenerateParams::new(n, SamplingParams::default(), vec![]), |_| {})
        .unwrap()
        .tokens
}

fn speculate(
    draft: &Model,
    target: &Model,
    prompt: &[u32],
    k: usize,
    n: usize,
    sampling: SamplingParams,
    rule: AcceptRule,
) -> Vec<u32> {
    let vocab = draft.config().vocab_size.min(target.config().vocab_size);
    let p = SpecParams { k, adaptive: false, max_tokens: n, sampling, eos_ids: vec![], rule };
    SpeculativeDecoder::new(draft, target, vocab, prompt, p).unwrap().run().unwrap()
}

#[test]
fn greedy_equals_target_on_reference_models() {
    for (case, arch, vocab) in
        [("llama2-tiny", Architecture::Llama, 32000), ("pythia-tiny", Architecture::GptNeoX, 50304)]
    {
        let Some(dir) = common::shared(&format!("fixtures/reference/{case}")) else { return };
        let target = load(dir.to_str().unwrap(), &cpu()).unwrap();
        let (_d, draft) = tiny(arch, vocab, 77);
        let prompt = target.tokenizer().unwrap().encode("The capital of France is", true).unwrap();
        let want = greedy(&target.model, &prompt, 24);
        for k in [1, 3, 8] {
            let got =
                speculate(&draft.model, &target.model, &prompt, k, 24, SamplingParams::default(), AcceptRule::Correct);
            assert_eq!(got, want, "{case}, k={k}");
        }
        // A draft that is the target itself accepts everything.
        let mut dec = SpeculativeDecoder::new(
            &target.model,
            &target.model,
            vocab,
            &prompt,
            SpecParams {
                k: 4,
                adaptive: false,
                max_tokens: 24,
                sampling: SamplingParams::default(),
                eos_ids: vec![],
                rule: AcceptRule::Correct,
            },
        )
        .unwrap();
        assert_eq!(dec.run().unwrap(), want);
        assert_eq!(dec.stats.acceptance_rate(), 1.0);
    }
}

#[test]
fn greedy_equals_target_on_smollm2_pair() {
    let Some(path) = common::smollm2() else { return };
    let p = path.to_str().unwrap();
    let draft = load(p, &LoadOptions { device: Some(billion::load::DeviceSpec::Cpu), ..Default::default() }).unwrap();
    let target =
        load(p, &LoadOptions { device: Some(billion::load::DeviceSpec::Cpu), dequantize: true, ..Default::default() })
            .unwrap();
    assert!(target.model.weight_bytes() > 3 * draft.model.weight_bytes(), "the target is the dequantized copy");
    let prompt = target
        .tokenizer()
        .unwrap()
        .encode("<|im_start|>user\nList three colors.<|im_end|>\n<|im_start|>assistant\n", false)
        .unwrap();
    let want = greedy(&target.model, &prompt, 24);
    for k in [1, 3, 8] {
        let got =
            speculate(&draft.model, &target.model, &prompt, k, 24, SamplingParams::default(), AcceptRule::Correct);
        assert_eq!(got, want, "SmolLM2 Q4_1 → f32, k={k}");
    }
}

/// Upper tail of the chi-square distribution (regularized upper incomplete gamma Q(df/2, x/2)).
fn chi_square_p(x: f64, df: usize) -> f64 {
    let (a, x) = (df as f64 / 2.0, x / 2.0);
    let ln_gamma = |z: f64| {
        // Lanczos approximation.
        let g = [
            676.5203681218851,
            -1259.1392167224028,
            771.323_428_777_653_1,
            -176.615_029_162_140_6,
            12.507343278686905,
            -0.13857109526572012,
            9.984_369_578_019_572e-6,
            1.5056327351493116e-7,
        ];
        let z = z - 1.0;
        let mut s = 0.999_999_999_999_809_9;
        for (i, c) in g.iter().enumerate() {
            s += c / (z + i as f64 + 1.0);
        }
        let t = z + 7.5;
        0.5 * (2.0 * std::f64::consts::PI).ln() + (z + 0.5) * t.ln() - t + s.ln()
    };
    if x < a + 1.0 {
        let (mut sum, mut term, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..500 {
            n += 1.0;
            term *= x / n;
            sum += term;
        }
        1.0 - sum * (-x + a * x.ln() - ln_gamma(a)).exp()
    } else {
        // Continued fraction (modified Lentz).
        let (mut b, mut c, mut d) = (x + 1.0 - a, 1e300, 1.0 / (x + 1.0 - a));
        let mut h = d;
        for i in 1..500 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            d = 1.0 / if d.abs() < 1e-300 { 1e-300 } else { d };
            c = b + an / c;
            if c.abs() < 1e-300 {
                c = 1e-300;
            }
            h *= d * c;
        }
        (-x + a * x.ln() - ln_gamma(a)).exp() * h
    }
}

fn chi_square(observed: &[usize], expected: &[f64]) -> (f64, usize, bool) {
    let mut x = 0.0;
    let mut bins = 0;
    let mut impossible = false;
    for (o, e) in observed.iter().zip(expected) {
        if *e < 1e-12 {
            impossible |= *o > 0;
            continue;
        }
        x += (*o as f64 - e).powi(2) / e;
        bins += 1;
    }
    (x, bins - 1, impossible)
}

fn target_distributions(target: &Model, prompt: &[u32], s: &SamplingParams) -> (Vec<f64>, Vec<f64>) {
    let mut cache = target.new_cache();
    let l = target
        .forward_last(&target.input(prompt).unwrap(), &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let p1: Vec<f64> = probabilities(&l, s.temperature, s.top_k, s.top_p).iter().map(|&p| p as f64).collect();
    let mut p2 = vec![0.0; p1.len()];
    for (x, &px) in p1.iter().enumerate() {
        if px == 0.0 {
            continue;
        }
        let mut c = cache.clone();
        let l2 = target
            .forward_last(&target.input(&[x as u32]).unwrap(), &mut c)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (y, q) in probabilities(&l2, s.temperature, s.top_k, s.top_p).iter().enumerate() {
            p2[y] += px * *q as f64;
        }
    }
    (p1, p2)
}

/// p-values of the first and second generated tokens against the target's exact distributions.
fn distribution_p_values(
    draft: &Model,
    target: &Model,
    s: &SamplingParams,
    rule: AcceptRule,
    runs: usize,
) -> (f64, f64) {
    let prompt = [1u32, 5, 9];
    let (p1, p2) = target_distributions(target, &prompt, s);
    let v = p1.len();
    let (mut c1, mut c2) = (vec![0usize; v], vec![0usize; v]);
    // The prompt's prefix is computed once; every run starts from copies of those caches.
    let (mut dc, mut tc) = (draft.new_cache(), target.new_cache());
    draft.forward_last(&draft.input(&prompt[..2]).unwrap(), &mut dc).unwrap();
    target.forward_last(&target.input(&prompt[..2]).unwrap(), &mut tc).unwrap();
    for seed in 0..runs as u64 {
        let params = SpecParams {
            k: 2,
            adaptive: false,
            max_tokens: 2,
            sampling: SamplingParams { seed, ..s.clone() },
            eos_ids: vec![],
            rule,
        };
        let out = SpeculativeDecoder::new(draft, target, v, &prompt, params)
            .unwrap()
            .with_caches(dc.clone(), tc.clone())
            .run()
            .unwrap();
        c1[out[0] as usize] += 1;
        c2[out[1] as usize] += 1;
    }
    let e1: Vec<f64> = p1.iter().map(|p| p * runs as f64).collect();
    let e2: Vec<f64> = p2.iter().map(|p| p * runs as f64).collect();
    let (x1, df1, bad1) = chi_square(&c1, &e1);
    let (x2, df2, bad2) = chi_square(&c2, &e2);
    let pv = |x, df, bad| if bad { 0.0 } else { chi_square_p(x, df) };
    (pv(x1, df1, bad1), pv(x2, df2, bad2))
}

#[test]
fn sampled_tokens_follow_the_target_distribution() {
    assert!(
        (chi_square_p(3.84, 1) - 0.05).abs() < 1e-3 && (chi_square_p(30.58, 15) - 0.01).abs() < 1e-3,
        "chi-square tail"
    );
    let (_t, target) = tiny(Architecture::Llama, 16, 1);
    let (_d, draft) = tiny(Architecture::Llama, 16, 2);
    let runs = 20_000;
    let t1 = SamplingParams { temperature: 1.0, ..Default::default() };
    let t07 = SamplingParams { temperature: 0.7, top_p: Some(0.9), ..Default::default() };
    for s in [&t1, &t07] {
        let (a, b) = distribution_p_values(&draft.model, &target.model, s, AcceptRule::Correct, runs);
        eprintln!("T={} top_p={:?}: p(first)={a:.4}, p(second)={b:.4}", s.temperature, s.top_p);
        assert!(a > 0.001 && b > 0.001, "T={}: p-values {a}, {b}", s.temperature);
    }
    // The same test catches a wrong acceptance rule (accept every drafted token): that samples from the draft.
    let (a, b) = distribution_p_values(&draft.model, &target.model, &t1, AcceptRule::AlwaysAccept, 5_000);
    eprintln!("always-accept rule: p(first)={a:.2e}, p(second)={b:.2e}");
    assert!(a < 0.001, "a broken rule must fail the test (p = {a})");
}

#[test]
fn caches_hold_exactly_the_accepted_prefix_after_each_round() {
    let (_t, target) = tiny(Architecture::Llama, 64, 3);
    let (_d, draft) = tiny(Architecture::Llama, 64, 4);
    let prompt = [1u32, 7, 8, 9];
    let sampling = SamplingParams { temperature: 1.0, seed: 5, ..Default::default() };
    let p = SpecParams { k: 4, adaptive: false, max_tokens: 40, sampling, eos_ids: vec![], rule: AcceptRule::Correct };
    let mut dec = SpeculativeDecoder::new(&draft.model, &target.model, 64, &prompt, p).unwrap();
    // Prefill as run() does, then step round by round.
    let head = &prompt[..3];
    draft.model.forward_last(&draft.model.input(head).unwrap(), &mut dec.dcache).unwrap();
    target.model.forward_last(&target.model.input(head).unwrap(), &mut dec.tcache).unwrap();
    let mut rejections = 0;
    while !dec.done {
        let before = dec.stats.accepted;
        let drafted = dec.stats.drafted;
        dec.round().unwrap();
        if dec.stats.accepted - before < dec.stats.drafted - drafted {
            rejections += 1;
        }
        assert_eq!(dec.tcache.len(), dec.seq.len() - 1, "target cache = sequence minus the pending token");
        assert!(dec.dcache.len() < dec.seq.len());
        // The cached keys/values are those of the accepted sequence: continuing equals a fresh forward.
        for (model, cache) in [(&target.model, &dec.tcache), (&draft.model, &dec.dcache)] {
            let mut c = cache.clone();
            let cont = model.forward_last(&model.input(&dec.seq[c.len()..]).unwrap(), &mut c).unwrap();
            let mut fresh = model.new_cache();
            let full = model.forward_last(&model.input(&dec.seq).unwrap(), &mut fresh).unwrap();
            let d = (cont - full).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "cache content differs by {d}");
        }
    }
    assert!(rejections > 0, "the random pair disagrees sometimes");
}

#[test]
fn incompatible_tokenizers_are_refused() {
    let (Some(a), Some(b)) =
        (common::shared("fixtures/reference/llama2-tiny"), common::shared("fixtures/reference/llama3-tiny"))
    else {
        return;
    };
    let out = common::billion(&[
        "speculative",
        "--draft",
        a.to_str().unwrap(),
        "--target",
        b.to_str().unwrap(),
        "--prompt",
        "Hi",
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("tokenizer"), "{err}");
    let da = load(a.to_str().unwrap(), &cpu()).unwrap();
    let db = load(b.to_str().unwrap(), &cpu()).unwrap();
    assert!(check_compatible((&da.model, da.tokenizer.as_ref()), (&db.model, db.tokenizer.as_ref())).is_err());
}

#[test]
fn cli_reports_statistics_and_keeps_results() {
    let (d1, _) = tiny(Architecture::Llama, 320, 1);
    let (d2, _) = tiny(Architecture::Llama, 320, 1);
    let results = d1.path().join("spec.json");
    for k in ["2", "3"] {
        let out = common::billion(&[
            "speculative",
            "--draft",
            d1.path().to_str().unwrap(),
            "--target",
            d2.path().to_str().unwrap(),
            "--prompt-ids",
            "1,2,3",
            "--k",
            k,
            "--max-tokens",
            "12",
            "--json",
            "--results",
            results.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        let v: serde_json::Value = serde_json::from_str(common::stdout(&out).lines().next().unwrap()).unwrap();
        assert_eq!(v["tokens"].as_array().unwrap().len(), 12);
        assert_eq!(v["stats"]["acceptance_rate"], 1.0, "identical draft and target agree");
        assert!(v["stats"]["speedup"].as_f64().unwrap() > 0.0);
    }
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    assert_eq!(doc["runs"].as_array().unwrap().len(), 2, "one record per k");
}
