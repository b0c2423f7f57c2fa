#pragma once
// Expands the compressed host lists batch systems print (Slurm's NodeList): "jrc[0025-0026,0030]",
// "n[1-3]-ib", "a[1-2]b[3-4]", several groups separated by commas. Pure function; any thread.
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "unicore/result.hpp"

namespace kb::unicore {

// Host names in order of appearance. Errors (kind bad_reply) name the offending part; expansions of
// more than `max_hosts` names are refused so a hostile value cannot exhaust memory.
Result<std::vector<std::string>> expand_hostlist(std::string_view list,
                                                 std::size_t max_hosts = 65536);

}  // namespace kb::unicore
