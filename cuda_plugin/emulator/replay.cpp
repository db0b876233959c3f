// Replays recorded plugin calls (tests/conftest.py writes them with VOLCONV_CUDA_RECORD=DIR) against the plugin
// built for the emulator, in forward, reverse and random thread/block order: the outputs must be the same bits
// in every order, and none NaN where the recorded run wrote numbers. Built with -fsanitize=thread (replay.py)
// it is the TSan pass: TSan needs an instrumented main program, which Python with libtsan preloaded is not.
//     replay PLUGIN.so FILE.vcr...        exit status: 0 all good, 1 a failure (each printed)
// A call's form (volconv_cuda.h): int f(int dtype, const void *in..., void *out..., const long long *params,
// void *stream); every argument after dtype is pointer-sized, so one prototype with room for the most serves all.
#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr int MAX_POINTERS = 14;
using Entry = int (*)(int, void *, void *, void *, void *, void *, void *, void *, void *, void *, void *, void *,
                      void *, void *, void *);

struct Record {
    std::string name;
    int dtype = 0;
    std::vector<std::vector<char>> inputs;   // empty and null: a NULL pointer
    std::vector<bool> null;
    std::vector<long long> out_bytes;
    std::vector<long long> params;
};

template <typename T>
T take(const std::vector<char> &b, size_t &at)
{
    T v;
    if (at + sizeof v > b.size())
        throw std::runtime_error("truncated record");
    std::memcpy(&v, b.data() + at, sizeof v);
    at += sizeof v;
    return v;
}

Record read(const char *path)
{
    std::ifstream f(path, std::ios::binary);
    std::vector<char> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    size_t at = 4;
    if (b.size() < 4 || std::memcmp(b.data(), "VCR1", 4))
        throw std::runtime_error("not a VCR1 record");
    Record r;
    const int n = take<int32_t>(b, at);
    r.name.assign(b.data() + at, n);
    at += n;
    r.dtype = take<int32_t>(b, at);
    const int inputs = take<int32_t>(b, at);
    for (int i = 0; i < inputs; i++) {
        const long long bytes = take<int64_t>(b, at);
        r.null.push_back(bytes < 0);
        r.inputs.emplace_back(b.begin() + at, b.begin() + at + (bytes < 0 ? 0 : bytes));
        at += bytes < 0 ? 0 : bytes;
    }
    const int outputs = take<int32_t>(b, at);
    for (int i = 0; i < outputs; i++)
        r.out_bytes.push_back(take<int64_t>(b, at));
    const int params = take<int32_t>(b, at);
    for (int i = 0; i < params; i++)
        r.params.push_back(take<int64_t>(b, at));
    return r;
}

// The outputs of one call of r in this thread order (fresh buffers, all bits set: NaN until written).
std::vector<std::vector<char>> run(Entry f, Record &r, const char *order, int *code)
{
    setenv("CUDA_EMU_ORDER", order, 1);
    std::vector<std::vector<char>> outs;
    for (long long n : r.out_bytes)
        outs.emplace_back(n, char(0xff));
    void *args[MAX_POINTERS] = {};
    int k = 0;
    for (size_t i = 0; i < r.inputs.size(); i++)
        args[k++] = r.null[i] ? nullptr : r.inputs[i].data();
    for (auto &o : outs)
        args[k++] = o.data();
    args[k++] = r.params.data();
    args[k++] = nullptr;   // the stream
    *code = f(r.dtype, args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7], args[8], args[9],
              args[10], args[11], args[12], args[13]);
    return outs;
}

template <typename T>
bool any_nan(const std::vector<char> &o)
{
    for (size_t i = 0; i + sizeof(T) <= o.size(); i += sizeof(T)) {
        T v;
        std::memcpy(&v, o.data() + i, sizeof v);
        if (std::isnan(v))
            return true;
    }
    return false;
}

bool has_nan(const std::vector<char> &o, int dtype) { return dtype == 0 ? any_nan<float>(o) : any_nan<double>(o); }

}  // namespace

int main(int argc, char **argv)
{
    if (argc < 3) {
        std::fprintf(stderr, "usage: replay PLUGIN.so FILE.vcr...\n");
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        std::fprintf(stderr, "replay: %s\n", dlerror());
        return 2;
    }
    int failures = 0;
    for (int i = 2; i < argc; i++) {
        Record r = read(argv[i]);
        if (r.inputs.size() + r.out_bytes.size() + 2 > MAX_POINTERS) {
            std::printf("%s: %s has more arguments than replay takes\n", argv[i], r.name.c_str());
            failures++;
            continue;
        }
        auto f = reinterpret_cast<Entry>(dlsym(lib, r.name.c_str()));
        if (!f) {
            std::printf("%s: no function %s in the plugin\n", argv[i], r.name.c_str());
            failures++;
            continue;
        }
        int code = 0;
        auto first = run(f, r, "forward", &code);
        bool ok = code == 0;
        for (const char *order : {"reverse", "random"}) {
            int c = 0;
            ok = run(f, r, order, &c) == first && c == 0 && ok;
        }
        const bool nan = has_nan(first[0], r.dtype);   // (the first output; later ones may be scratch)
        if (!ok || nan) {
            std::printf("%s: %s (code %d): %s\n", argv[i], r.name.c_str(), code,
                        !ok ? "outputs differ between thread orders" : "NaN in the first output");
            failures++;
        }
    }
    std::printf("replay: %d calls, %d failed\n", argc - 2, failures);
    return failures != 0;
}
