#pragma once
// ReplayBuffer: the sender's sequenced frames, stored contiguously in blocks (a frame never spans
// two blocks), from the oldest unacknowledged frame to the newest. A cursor marks the first frame
// not yet written to the current transport; a resume moves it back. Consecutive frames of a block
// go to the transport in one write, so writes gather many frames without copying them again.
// Used by LinkSession on its io_context thread.
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

namespace kb::tunnel {

class ReplayBuffer {
 public:
  struct Block {
    explicit Block(std::size_t capacity) : data(new std::uint8_t[capacity]), cap(capacity) {}
    std::unique_ptr<std::uint8_t[]> data;
    std::size_t cap;
    std::size_t used = 0;
  };
  using BlockPtr = std::shared_ptr<Block>;

  // A run of whole frames to write. `block` keeps the memory alive while the write is in flight.
  struct Chunk {
    BlockPtr block;
    const std::uint8_t* data = nullptr;
    std::size_t size = 0;
    std::uint64_t first_seq = 0, last_seq = 0;
    std::size_t frames = 0;
  };

  explicit ReplayBuffer(std::size_t block_size) : block_size_(block_size) {}

  // Space for one frame of `n` bytes at the tail; finish with commit(n). The seq of the committed
  // frame is next_seq().
  std::uint8_t* reserve(std::size_t n);
  void commit(std::size_t n);

  std::uint64_t next_seq() const { return next_seq_; }    // seq the next frame gets
  std::uint64_t acked() const { return front_seq_ - 1; }  // highest acknowledged seq
  std::uint64_t sent() const { return cursor_seq_ - 1; }  // highest seq written (this transport)
  std::size_t bytes() const { return bytes_; }            // all frames held
  std::size_t unsent_bytes() const { return unsent_bytes_; }  // frames after the cursor

  // An empty buffer whose next frame gets `seq` (a session handed over by a previous process goes
  // on numbering where it stopped). Only while nothing is held.
  void continue_at(std::uint64_t seq) {
    if (bytes_ != 0 || seq == 0) return;
    front_seq_ = cursor_seq_ = next_seq_ = seq;
  }
  // Frees every frame with seq <= upto (callers validate acked() <= upto <= sent()).
  void ack(std::uint64_t upto);
  // After a resume: frees frames <= upto and moves the cursor to the first frame after it.
  void rewind(std::uint64_t upto);
  // The frames after the cursor in the cursor's block (empty if none); advances the cursor.
  bool take_unsent(Chunk& out);
  // Releases cached memory when nothing is buffered (idle sessions stay small).
  void trim();

 private:
  void pop_front_block();

  std::size_t block_size_;
  std::deque<BlockPtr> blocks_;
  std::vector<BlockPtr> spare_;  // at most one, reused to avoid allocator churn under load
  std::size_t front_off_ = 0;    // offset of the oldest frame in blocks_[0]
  std::uint64_t front_seq_ = 1;  // seq of the oldest frame held (or next_seq_ if empty)
  std::size_t cursor_block_ = 0, cursor_off_ = 0;
  std::uint64_t cursor_seq_ = 1;
  std::uint64_t next_seq_ = 1;
  std::size_t bytes_ = 0, unsent_bytes_ = 0;
};

}  // namespace kb::tunnel
