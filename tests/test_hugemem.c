/* test_hugemem.c -- large buffers: zeroed, 2 MiB-aligned, writable, and a clear
 * failure (NULL and errno, no crash) for sizes that cannot be mapped. */
#include <errno.h>
#include <stdint.h>

#include "core/hugemem.h"
#include "tests/testutil.h"

START_TEST(alloc_is_zeroed_aligned_and_writable)
{
    size_t size = ((size_t)5 << 20) + 123;   /* not a multiple of any page size */
    unsigned char *p = hugemem_alloc(size);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq((uintptr_t)p % ((uintptr_t)2 << 20), 0);
    for (size_t i = 0; i < size; i++)
        if (p[i] != 0) ck_abort_msg("byte %zu is %d, not 0", i, p[i]);
    for (size_t i = 0; i < size; i++) p[i] = (unsigned char)(i * 7u);
    for (size_t i = 0; i < size; i++)
        if (p[i] != (unsigned char)(i * 7u)) ck_abort_msg("byte %zu did not keep its value", i);
    hugemem_free(p, size);
}
END_TEST

START_TEST(reserve_is_aligned)
{
    size_t size = (size_t)3 << 20;
    void *p = hugemem_reserve(size);
    ck_assert_ptr_nonnull(p);
    ck_assert_uint_eq((uintptr_t)p % ((uintptr_t)2 << 20), 0);
    hugemem_free(p, size);
}
END_TEST

START_TEST(impossible_sizes_fail_cleanly)
{
    errno = 0;
    ck_assert_ptr_null(hugemem_alloc(0));
    ck_assert_int_eq(errno, EINVAL);
    errno = 0;
    ck_assert_ptr_null(hugemem_alloc(SIZE_MAX - 100));
    ck_assert_int_eq(errno, ENOMEM);
    ck_assert_ptr_null(hugemem_reserve(SIZE_MAX));
    hugemem_free(NULL, 123);   /* a no-op */
}
END_TEST

int main(void)
{
    Suite *s = suite_create("hugemem");
    TCase *tc = tcase_create("hugemem");
    tcase_add_test(tc, alloc_is_zeroed_aligned_and_writable);
    tcase_add_test(tc, reserve_is_aligned);
    tcase_add_test(tc, impossible_sizes_fail_cleanly);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
