// Tests of bridge/process_handover.cpp: the handover document round-trips every field and
// descriptor; a document that is not one, of another version, naming a descriptor that did not
// arrive or naming one twice is refused with a reason; receive_handover ignores LISTEN_* meant
// for another process and closes what it cannot use.
#include "bridge/process_handover.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <stdexcept>

namespace kb::bridge {
namespace {

HandedOver sample(int base) {
  HandedOver h;
  h.allocation_id = "a" + std::to_string(base);
  for (int i = 0; i < 5; ++i) h.link.listeners[i] = base + i;
  auto& l = h.link.link;
  l.self_id = std::string(32, 'b');
  l.peer_id = std::string(32, 'c');
  l.peer_window = 262144;
  l.next_seq = 12345678901ull;
  l.last_received = 987;
  l.next_stream_id = 7;
  l.streams.push_back({3, tunnel::ChannelKind::iopub, 1000, 24, true, false, true, base + 5});
  l.streams.push_back({6, tunnel::ChannelKind::hb, 262144, 0, false, true, false, base + 6});
  return h;
}

TEST(ProcessHandover, TheDocumentRoundTripsEveryFieldAndDescriptor) {
  const auto package = encode_handover({sample(100), sample(200)});
  ASSERT_EQ(package.fds.size(), 14u);
  EXPECT_EQ(package.fds[0], 100);
  EXPECT_EQ(package.fds[13], 206);
  // The next process gets other numbers for the same descriptors.
  std::vector<int> arrived;
  for (int fd : package.fds) arrived.push_back(fd + 1000);
  const auto back = decode_handover(package.document, arrived);
  ASSERT_EQ(back.size(), 2u);
  const auto& h = back[1];
  EXPECT_EQ(h.allocation_id, "a200");
  EXPECT_EQ(h.link.listeners[0], 1200);
  EXPECT_EQ(h.link.listeners[4], 1204);
  EXPECT_EQ(h.link.link.self_id, std::string(32, 'b'));
  EXPECT_EQ(h.link.link.peer_id, std::string(32, 'c'));
  EXPECT_EQ(h.link.link.peer_window, 262144u);
  EXPECT_EQ(h.link.link.next_seq, 12345678901ull);
  EXPECT_EQ(h.link.link.last_received, 987u);
  EXPECT_EQ(h.link.link.next_stream_id, 7u);
  ASSERT_EQ(h.link.link.streams.size(), 2u);
  const auto& s = h.link.link.streams[0];
  EXPECT_EQ(s.id, 3u);
  EXPECT_EQ(s.kind, tunnel::ChannelKind::iopub);
  EXPECT_EQ(s.credit, 1000u);
  EXPECT_EQ(s.credit_to_return, 24u);
  EXPECT_TRUE(s.read_eof);
  EXPECT_FALSE(s.peer_fin);
  EXPECT_TRUE(s.shut_down);
  EXPECT_EQ(s.fd, 1205);
  EXPECT_EQ(h.link.link.streams[1].kind, tunnel::ChannelKind::hb);
  EXPECT_TRUE(h.link.link.streams[1].peer_fin);
}

void expect_refused(const std::string& doc, const std::vector<int>& fds, const std::string& why) {
  try {
    decode_handover(doc, fds);
    ADD_FAILURE() << "accepted: " << doc;
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
  }
}

TEST(ProcessHandover, DocumentsThatCannotBeTrustedAreRefusedWithAReason) {
  const auto package = encode_handover({sample(10)});
  std::vector<int> fds = package.fds;
  expect_refused("not json", fds, "not a kernel-bridge handover document");
  expect_refused(R"({"format":"other","version":1,"kernels":[]})", fds, "not a kernel-bridge");
  expect_refused(R"({"format":"kernel-bridge-handover","version":2,"kernels":[]})", fds,
                 "version 2");
  std::vector<int> missing = fds;
  missing[5] = -1;  // a client connection did not arrive
  expect_refused(package.document, missing, "descriptor 5 did not arrive");
  std::vector<int> short_list(fds.begin(), fds.begin() + 3);
  expect_refused(package.document, short_list, "did not arrive");
  std::string twice = package.document;
  const auto at = twice.find("\"fd\":5");
  ASSERT_NE(at, std::string::npos);
  twice.replace(at, 6, "\"fd\":0");
  expect_refused(twice, fds, "named twice");
  std::string four =
      R"({"format":"kernel-bridge-handover","version":1,"kernels":[{"allocation":"x",)"
      R"("listeners":[0,1,2,3],"link":{}}]})";
  expect_refused(four, fds, "not five listeners");
  expect_refused(R"({"format":"kernel-bridge-handover","version":1,"kernels":[{"allocation":1}]})",
                 fds, "malformed");
}

TEST(ProcessHandover, ListenFdsMeantForAnotherProcessAreIgnoredAndCleared) {
  ::setenv("LISTEN_PID", std::to_string(::getpid() + 1).c_str(), 1);
  ::setenv("LISTEN_FDS", "3", 1);
  ::setenv("LISTEN_FDNAMES", "kb-fd-0:kb-fd-1:kb-handover", 1);
  std::string error;
  EXPECT_TRUE(receive_handover(error).empty());
  EXPECT_TRUE(error.empty()) << error;
  EXPECT_EQ(std::getenv("LISTEN_FDS"), nullptr);
  EXPECT_EQ(std::getenv("LISTEN_PID"), nullptr);
}

TEST(ProcessHandover, AnUnreadableDocumentClosesTheDescriptorsAndSaysWhy) {
  // Descriptors 3.. as the convention has them: a pipe as "kb-fd-0", and a file with garbage
  // as the document.
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  char doc_path[] = "/tmp/kb-handover-test-XXXXXX";
  const int doc = ::mkstemp(doc_path);
  ASSERT_GE(doc, 0);
  ::unlink(doc_path);
  ASSERT_EQ(::write(doc, "garbage", 7), 7);
  // The convention puts them at 3 and 4, which the test runner may use: a child process.
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::dup2(p[0], 3);
    ::dup2(doc, 4);
    ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
    ::setenv("LISTEN_FDS", "2", 1);
    ::setenv("LISTEN_FDNAMES", "kb-fd-0:kb-handover", 1);
    ::unsetenv("NOTIFY_SOCKET");
    std::string error;
    const bool empty = receive_handover(error).empty();
    const bool said = error.find("cannot be used") != std::string::npos &&
                      error.find("not a kernel-bridge handover document") != std::string::npos;
    const bool closed = ::fcntl(3, F_GETFD) == -1 && ::fcntl(4, F_GETFD) == -1;
    std::_Exit(empty && said && closed ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ::close(p[0]);
  ::close(p[1]);
  ::close(doc);
}

}  // namespace
}  // namespace kb::bridge
