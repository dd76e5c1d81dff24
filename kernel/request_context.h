// The request a sampled Python thread is running, as its process published it.
//
// Contract with user space (ebpf_stream/_context mirrors it: layout.py the
// offsets and the lookup, region.py the value):
//  * a process that publishes has, in its `python_process`, the address of
//    one ContextVar, that variable's 32-bit HAMT hash, the offset of
//    PyThreadState.context and the addresses of the HAMT's node types and
//    of `bytes`;
//  * the variable's value in the running context is a 32-byte bytes object:
//    trace id, span id, route and method (cpu_sample.h's REQUEST_BYTES,
//    copied as is).
//
// The running context is the thread state's `context`: an asyncio task's
// own while it runs, the thread's otherwise.  Its variables are a HAMT,
// looked up here as CPython's hamt_node_find does, one level per 5 bits of
// the hash.  The trie is immutable and the thread read is the one
// sampled, so nothing changes under the walk.  A collision node (two
// variables of one 32-bit hash) ends the lookup with nothing.

#define CONTEXT_VARS 24        // PyContext.ctx_vars
#define HAMT_ROOT 16           // PyHamtObject.h_root
#define OB_TYPE 8
#define OB_SIZE 16
#define BITMAP_BITS 24         // PyHamtNode_Bitmap.b_bitmap
#define BITMAP_ARRAY 32        // PyHamtNode_Bitmap.b_array: (key, value) pairs
#define ARRAY_NODES 16         // PyHamtNode_Array.a_array
#define BYTES_DATA 32          // PyBytesObject.ob_sval
#define HAMT_LEVELS 7

struct request_value {         // a bytes object of REQUEST_BYTES, header included
    u64 refcnt;
    u64 type;
    u64 size;
    u64 hash;
    u8 data[REQUEST_BYTES];
};

static __always_inline u32 popcount32(u32 x) {
    x = x - ((x >> 1) & 0x55555555);
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333);
    x = (x + (x >> 4)) & 0x0F0F0F0F;
    return (x * 0x01010101) >> 24;
}

// Copies the running context's request into `out` (REQUEST_BYTES), which
// stays as it was (zeroed by the caller) when there is none.
static __always_inline void request_context(struct python_process *p, u64 tstate, u8 *out) {
    if (!p->context_var)
        return;
    u64 context = read_u64(tstate + p->thread_context);
    if (!context)
        return;
    u64 node = read_u64(read_u64(context + CONTEXT_VARS) + HAMT_ROOT);
    u32 hash = p->context_hash;
    u64 value = 0;
    #pragma clang loop unroll(disable)
    for (u32 level = 0; level < HAMT_LEVELS && node; level++) {
        u32 index = (hash >> (level * 5)) & 31;
        u64 type = read_u64(node + OB_TYPE);
        if (type == p->array_type) {
            node = read_u64(node + ARRAY_NODES + index * 8);
            continue;
        }
        if (type != p->bitmap_type)
            break;
        u32 bitmap = 0;
        bpf_probe_read_user(&bitmap, sizeof(bitmap), (void *)(node + BITMAP_BITS));
        u32 bit = 1U << index;
        if (!(bitmap & bit))
            break;
        u64 pair = node + BITMAP_ARRAY + popcount32(bitmap & (bit - 1)) * 16;
        u64 key = read_u64(pair);
        u64 found = read_u64(pair + 8);
        if (key) {
            if (key == p->context_var)
                value = found;
            break;
        }
        node = found;
    }
    if (!value)
        return;
    struct request_value v;
    if (bpf_probe_read_user(&v, sizeof(v), (void *)value))
        return;
    if (v.type == p->bytes_type && v.size == REQUEST_BYTES)
        __builtin_memcpy(out, v.data, REQUEST_BYTES);
}
