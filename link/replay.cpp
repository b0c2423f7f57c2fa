#include "link/replay.hpp"

#include <algorithm>

#include "link/frame.hpp"

namespace kb::tunnel {

std::uint8_t* ReplayBuffer::reserve(std::size_t n) {
  if (blocks_.empty() || blocks_.back()->cap - blocks_.back()->used < n) {
    BlockPtr block;
    if (n <= block_size_ && !spare_.empty()) {
      block = std::move(spare_.back());
      spare_.pop_back();
      block->used = 0;
    } else {
      block = std::make_shared<Block>(std::max(n, block_size_));
    }
    blocks_.push_back(std::move(block));
  }
  auto& b = *blocks_.back();
  return b.data.get() + b.used;
}

void ReplayBuffer::commit(std::size_t n) {
  blocks_.back()->used += n;
  bytes_ += n;
  unsent_bytes_ += n;
  ++next_seq_;
}

void ReplayBuffer::pop_front_block() {
  BlockPtr b = std::move(blocks_.front());
  blocks_.pop_front();
  front_off_ = 0;
  if (cursor_block_ > 0) {
    --cursor_block_;
  } else {
    cursor_off_ = 0;  // the cursor was at the end of the popped block
  }
  // Reuse only a standard block that no in-flight write still references.
  if (b.use_count() == 1 && b->cap == block_size_ && spare_.empty()) spare_.push_back(std::move(b));
}

void ReplayBuffer::ack(std::uint64_t upto) {
  while (front_seq_ <= upto && bytes_ > 0) {
    auto& b = *blocks_.front();
    const auto h = frame::parse_header(b.data.get() + front_off_);
    const std::size_t len = frame::kHeaderSize + h.length;
    front_off_ += len;
    bytes_ -= len;
    ++front_seq_;
    if (front_seq_ > cursor_seq_) {
      // Only rewind() frees frames the cursor has not passed (they were sent on an old transport).
      cursor_seq_ = front_seq_;
      cursor_block_ = 0;
      cursor_off_ = front_off_;
      unsent_bytes_ -= len;
    }
    if (front_off_ == b.used) {
      const bool tail = blocks_.size() == 1;
      if (tail && blocks_.front().use_count() == 1) {
        // Keep the empty tail block for the next frames (no write references it).
        b.used = 0;
        front_off_ = 0;
        cursor_off_ = 0;
        cursor_block_ = 0;
      } else {
        pop_front_block();
      }
    }
  }
}

void ReplayBuffer::rewind(std::uint64_t upto) {
  ack(upto);
  cursor_block_ = 0;
  cursor_off_ = front_off_;
  cursor_seq_ = front_seq_;
  unsent_bytes_ = bytes_;
}

bool ReplayBuffer::take_unsent(Chunk& out) {
  while (cursor_block_ < blocks_.size() && cursor_off_ == blocks_[cursor_block_]->used &&
         cursor_block_ + 1 < blocks_.size()) {
    ++cursor_block_;
    cursor_off_ = 0;
  }
  if (cursor_block_ >= blocks_.size()) return false;
  const BlockPtr& b = blocks_[cursor_block_];
  if (cursor_off_ >= b->used) return false;
  out.block = b;
  out.data = b->data.get() + cursor_off_;
  out.size = b->used - cursor_off_;
  out.first_seq = cursor_seq_;
  // Count the frames (one header read per frame, no copy).
  std::size_t frames = 0;
  for (std::size_t off = 0; off < out.size; ++frames) {
    off += frame::kHeaderSize + frame::parse_header(out.data + off).length;
  }
  out.frames = frames;
  out.last_seq = cursor_seq_ + frames - 1;
  cursor_off_ = b->used;
  cursor_seq_ += frames;
  unsent_bytes_ -= out.size;
  return true;
}

void ReplayBuffer::trim() {
  spare_.clear();
  if (bytes_ == 0 && !blocks_.empty()) {
    blocks_.clear();
    front_off_ = cursor_off_ = cursor_block_ = 0;
  }
}

}  // namespace kb::tunnel
