# moeserve -- see README.md. Variants: `make` (release), `make SAN=1` (ASan+UBSan,
# into build-san/), `make SAN=thread` (ThreadSanitizer, into build-tsan/), `make test`,
# `make bench`, `make run`, `make tools`.

CC       ?= cc
SAN      ?= 0
PYTHON   ?= /usr/bin/python3
ARCHFLAGS ?= -march=native
PKGS     := openblas jansson libuv libmicrohttpd check

ifeq ($(SAN),1)
BUILD    := build-san
OPTFLAGS := -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
else ifeq ($(SAN),thread)
BUILD    := build-tsan
OPTFLAGS := -O1 -g -fsanitize=thread -fno-omit-frame-pointer
else
BUILD    := build
OPTFLAGS := -O3 -g
endif

# Recursive (=) so pkg-config runs after `make deps` has installed the packages.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs openblas jansson libuv libmicrohttpd 2>/dev/null)
CHECK_LIBS = $(shell pkg-config --libs check 2>/dev/null)

CFLAGS  = -std=c11 -Wall -Wextra -Werror -D_DEFAULT_SOURCE -D_POSIX_C_SOURCE=200809L \
          $(OPTFLAGS) $(ARCHFLAGS) -I. $(PKG_CFLAGS) -MMD -MP
LDFLAGS = $(OPTFLAGS)
LIBS    = $(PKG_LIBS) -lpthread -lm

CORE_SRC   := $(wildcard core/*.c)
MODELS_SRC := $(wildcard models/*.c)
CLI_SRC    := $(wildcard cli/*.c)
SERVER_SRC := $(filter-out server/main.c,$(wildcard server/*.c))
TEST_SRC   := $(wildcard tests/test_*.c)
TOOL_SRC   := $(wildcard tools/*.c)

LIB_OBJ    := $(patsubst %.c,$(BUILD)/obj/%.o,$(CORE_SRC) $(MODELS_SRC))
SERVER_OBJ := $(patsubst %.c,$(BUILD)/obj/%.o,$(SERVER_SRC))
TEST_BIN   := $(patsubst tests/%.c,$(BUILD)/tests/%,$(TEST_SRC))
TOOL_BIN   := $(patsubst tools/%.c,$(BUILD)/tools/%,$(TOOL_SRC))

PROGRAMS :=
ifneq ($(wildcard cli/moe.c),)
PROGRAMS += $(BUILD)/moe
endif
ifneq ($(wildcard server/main.c),)
PROGRAMS += $(BUILD)/moeserve
endif

.PHONY: all deps pkgcheck test tests tools bench bench-server bench-ensemble run clean
.SECONDARY:

all: $(BUILD)/libmoe.a $(PROGRAMS)

deps:
	@sh deploy/debian-deps.sh

# A plain `make` does not install packages; without them the compiler's first
# error would be an undeclared OpenBLAS function, so say what is missing instead.
pkgcheck:
	@pkg-config --exists $(PKGS) 2>/dev/null || { \
	  echo "moeserve: missing libraries (pkg-config: $(PKGS)); run 'make deps' as root, or 'make test' / 'make run', which do" >&2; \
	  exit 1; }

$(BUILD)/obj/%.o: %.c | pkgcheck
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libmoe.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libmoeserver.a: $(SERVER_OBJ) $(BUILD)/libmoe.a
	@rm -f $@
	ar rcs $@ $(SERVER_OBJ)

$(BUILD)/moe: $(patsubst %.c,$(BUILD)/obj/%.o,$(CLI_SRC)) $(BUILD)/libmoe.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/moeserve: $(BUILD)/obj/server/main.o $(BUILD)/libmoeserver.a $(BUILD)/libmoe.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/tests/%: $(BUILD)/obj/tests/%.o $(BUILD)/libmoeserver.a $(BUILD)/libmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS) $(CHECK_LIBS)

# The A/B timing programs of tools/ (docs/PERFORMANCE.md). `make test` builds
# them too, so they keep compiling against the library they measure.
$(BUILD)/tools/%: $(BUILD)/obj/tools/%.o $(BUILD)/obj/cli/membw.o $(BUILD)/libmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

tools: $(TOOL_BIN)

tests: all $(TEST_BIN) $(TOOL_BIN)

# Installs missing Debian packages first (as root), then builds in a fresh make so
# pkg-config sees them, then runs every suite. SAN=1 and SAN=thread run the same
# under sanitizers.
test:
	@$(MAKE) --no-print-directory deps
	@$(MAKE) --no-print-directory tests
	@PYTHON=$(PYTHON) sh tests/run.sh $(BUILD)

bench:
	@$(MAKE) --no-print-directory deps
	@$(MAKE) --no-print-directory all
	@sh tests/bench.sh $(BUILD)

bench-server:
	@$(MAKE) --no-print-directory deps
	@$(MAKE) --no-print-directory all
	@sh tests/bench_server.sh $(BUILD)

bench-ensemble:
	@$(MAKE) --no-print-directory deps
	@$(MAKE) --no-print-directory all
	@sh tests/bench_ensemble.sh $(BUILD)

run:
	@$(MAKE) --no-print-directory deps
	@$(MAKE) --no-print-directory all
	@sh deploy/run.sh $(BUILD)

clean:
	rm -rf build build-san build-tsan

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
