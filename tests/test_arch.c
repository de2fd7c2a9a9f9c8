/* test_arch.c -- the architecture table and parameter counting. */
#include "core/model.h"
#include "tests/testutil.h"

START_TEST(table_rows_match_the_facts)
{
    const moe_arch_info *l = moe_arch_get(MOE_ARCH_LLAMA);
    const moe_arch_info *q2 = moe_arch_get(MOE_ARCH_QWEN2MOE);
    const moe_arch_info *o = moe_arch_get(MOE_ARCH_OLMOE);
    const moe_arch_info *q3 = moe_arch_get(MOE_ARCH_QWEN3MOE);
    ck_assert(l->renorm_topk && !q2->renorm_topk && !o->renorm_topk && q3->renorm_topk);
    ck_assert_int_eq(l->rope, MOE_ROPE_NORMAL);
    ck_assert_int_eq(q2->rope, MOE_ROPE_NEOX);
    ck_assert_int_eq(o->rope, MOE_ROPE_NEOX);
    ck_assert_int_eq(q3->rope, MOE_ROPE_NEOX);
    ck_assert(q2->shared_expert && q2->qkv_bias && !l->shared_expert);
    ck_assert_int_eq(o->qk_norm, MOE_QK_NORM_FULL);
    ck_assert_int_eq(q3->qk_norm, MOE_QK_NORM_HEAD);
    ck_assert_ptr_null(moe_arch_get(MOE_ARCH_COUNT));
}
END_TEST

START_TEST(names_round_trip)
{
    for (int a = 0; a < MOE_ARCH_COUNT; a++)
        ck_assert_int_eq(moe_arch_from_name(moe_arch_get((moe_arch)a)->name), a);
    ck_assert_int_eq(moe_arch_from_name("gpt-j"), MOE_ARCH_COUNT);
    ck_assert_int_eq(moe_arch_from_name(NULL), MOE_ARCH_COUNT);
}
END_TEST

START_TEST(active_params_count_k_experts)
{
    moe_hparams hp = {.arch = MOE_ARCH_LLAMA, .n_vocab = 100, .n_embd = 8, .n_layer = 2,
                      .n_head = 2, .n_head_kv = 1, .head_dim = 4, .n_ff = 16,
                      .n_expert = 4, .n_expert_used = 2, .rope_dim = 4,
                      .rope_base = 10000, .rms_eps = 1e-5f};
    uint64_t total = moe_hparams_n_params(&hp, 0);
    uint64_t active = moe_hparams_n_params_active(&hp, 0);
    /* two experts fewer per layer, each 3 * n_ff * n_embd */
    ck_assert_uint_eq(total - active, 2ull * 2 * 3 * 16 * 8);
    ck_assert_uint_eq(moe_hparams_n_params(&hp, 0) - moe_hparams_n_params(&hp, 1), 100u * 8);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("arch");
    TCase *tc = tcase_create("table");
    tcase_add_test(tc, table_rows_match_the_facts);
    tcase_add_test(tc, names_round_trip);
    tcase_add_test(tc, active_params_count_k_experts);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
