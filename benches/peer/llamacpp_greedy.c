// Greedy decoding through llama.cpp's library, printing what `billion generate --json --top-logprobs 2`
// prints for the same prompt: the prompt's token ids, then every generated token with the two likeliest
// tokens of its step and their log-probabilities. Built and run by benches/llamacpp_peer.sh.
//
//   llamacpp_greedy MODEL.gguf PROMPT N_TOKENS THREADS   -> one JSON object on stdout
#include "llama.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static bool no_progress(float progress, void *data) {
    (void)progress, (void)data;
    return true;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT N_TOKENS THREADS\n", argv[0]);
        return 2;
    }
    const char *prompt = argv[2];
    int n_new = atoi(argv[3]), threads = atoi(argv[4]);
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.progress_callback = no_progress;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    int cap = (int)strlen(prompt) + 8;
    llama_token *ids = malloc(sizeof(llama_token) * (size_t)(cap + n_new));
    // Special tokens (<|im_start|>) parsed, no BOS added: the same ids `billion` gets with --prompt-ids.
    int n_prompt = llama_tokenize(vocab, prompt, (int)strlen(prompt), ids, cap, false, true);
    if (n_prompt <= 0) {
        fprintf(stderr, "cannot tokenize the prompt\n");
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (unsigned)(n_prompt + n_new + 8);
    cp.n_batch = cp.n_ctx;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot make a context\n");
        return 1;
    }
    printf("{\"prompt_ids\":[");
    for (int i = 0; i < n_prompt; i++) printf(i ? ",%d" : "%d", ids[i]);
    printf("],\"steps\":[");
    struct llama_batch batch = llama_batch_get_one(ids, n_prompt);
    for (int step = 0; step < n_new; step++) {
        if (llama_decode(ctx, batch)) {
            fprintf(stderr, "llama_decode failed at step %d\n", step);
            return 1;
        }
        const float *logits = llama_get_logits_ith(ctx, -1);
        int best = 0, second = -1;
        for (int t = 1; t < n_vocab; t++) {
            if (logits[t] > logits[best]) {
                second = best;
                best = t;
            } else if (second < 0 || logits[t] > logits[second]) {
                second = t;
            }
        }
        double max = logits[best], sum = 0;
        for (int t = 0; t < n_vocab; t++) sum += exp((double)logits[t] - max);
        double norm = max + log(sum);
        if (llama_vocab_is_eog(vocab, best)) break;
        printf("%s{\"id\":%d,\"top\":[[%d,%.6f],[%d,%.6f]]}", step ? "," : "", best, best, logits[best] - norm,
               second, logits[second] - norm);
        ids[n_prompt + step] = best;
        batch = llama_batch_get_one(&ids[n_prompt + step], 1);
    }
    printf("]}\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
